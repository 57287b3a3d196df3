"""rrcm-jax: rRCM (robust representation consistency models) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="rrcm-jax",
    version="0.1.0",
    description="Robust Representation Consistency Models and randomized-smoothing "
    "certification in JAX/Flax",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["rrcm_jax", "rrcm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The core library (models, losses, train steps, certification) needs only these.
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "scipy",
    ],
    extras_require={
        # Input pipelines (TFDS + tf.data); the core library imports them lazily.
        "data": ["tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9", "importlib_resources",
                 "tensorboard"],
        "plots": ["matplotlib"],
        "torch": ["torch", "timm", "transformers", "safetensors"],
        "test": [
            "tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9", "importlib_resources",
            "tensorboard", "matplotlib", "pytest", "pytest-xdist",
        ],
    },
)
