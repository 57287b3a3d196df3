"""Experiments that chain the rrcm-jax entry points into a study (see experiments/README.md)."""
