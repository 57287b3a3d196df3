"""rrcm-jax: Robust Representation Consistency Models (rRCM) and randomized-smoothing
certification in JAX/Flax. The core library imports without TensorFlow."""
__version__ = "0.1.0"
