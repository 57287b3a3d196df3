"""Test set-up: 8 simulated CPU devices (sharding tests).

XLA_FLAGS must be set before JAX initializes its backend, hence at import.

No persistent compilation cache: with jaxlib 0.10.2 on CPU, executables with
collectives loaded from it deadlock in the all-gather rendezvous or abort
(seen with the FSDP step on 8 simulated devices, and with gloo across two
processes). The suite fits CI's budget without it; compiled programs are
shared within a test process through session-scoped fixtures instead.
"""
import importlib.util
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# torch's CUDA wheels depend on triton, whose import segfaults once TensorFlow is loaded
# (TensorFlow then triton crashes; triton then TensorFlow works). The data tests load
# TensorFlow before torch's optional parts (torch._dynamo, via timm / transformers) pull
# triton in, so it is loaded first here when installed.
if importlib.util.find_spec("triton") is not None:
  import triton  # pylint: disable=g-import-not-at-top,unused-import

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import

# Recorded reference data (tests/testdata/README.md says what each file holds);
# RRCM_REFERENCE_DIR points the tests at another recording with the same layout.
REFERENCE_DIR = os.environ.get("RRCM_REFERENCE_DIR") or os.path.join(os.path.dirname(__file__), "testdata")


def reference_file(name):
  """Path of a recorded reference file (tests/testdata/ or $RRCM_REFERENCE_DIR)."""
  return os.path.join(REFERENCE_DIR, name)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests that start subprocesses")
