"""Test set-up: 8 simulated CPU devices (sharding tests).

XLA_FLAGS must be set before JAX initializes its backend, hence at import.

No persistent compilation cache: with jaxlib 0.10.2 on CPU, executables with
collectives loaded from it deadlock in the all-gather rendezvous or abort
(seen with the FSDP step on 8 simulated devices, and with gloo across two
processes). Compiled programs are shared within a test process instead:
through module-scoped fixtures, and through an in-memory memo of executables
(`_memoize_compilation` below).
"""
import collections
import hashlib
import importlib.util
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
# The tests' programs are tiny and compiling them is most of the suite's time: LLVM at -O0
# compiles a train step in about half the time. The XLA program (its HLO passes) is the
# same; the machine code is less optimized, and results agree to float32 rounding
# (relative 1e-7 on a loss). Subprocesses started with os.environ inherit it.
# RRCM_TEST_XLA_DEFAULT_OPT=1 keeps XLA's default level.
if (os.environ.get("RRCM_TEST_XLA_DEFAULT_OPT") != "1"
    and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]):
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
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
from jax._src import cache_key as _cache_key  # pylint: disable=g-import-not-at-top
from jax._src import compiler as _compiler  # pylint: disable=g-import-not-at-top


def _memoize_compilation():
  """Reuses an executable this process already compiled for the same program.

  Many tests build the same tiny models through the package's own entry points (each
  `pretrain.train` call jits a fresh step), so one worker compiles identical programs
  over and over: most of the suite's time on a 2-core CPU. The key is the program as
  JAX's persistent cache sees it (without debug info), the compile options (device
  assignment included), the devices and the backend; the executable stays in memory (no
  serialization, so not the persistent cache's collective deadlock described above).
  Programs with host callbacks or large embedded constants are compiled every time; the
  128 most recently used executables are kept. RRCM_TEST_COMPILE_MEMO=0 turns this off.
  """
  original = _compiler.compile_or_get_cached
  executables = collections.OrderedDict()   # the most recently used last

  def key_of(computation, devices, compile_options, backend):
    program = _cache_key._canonicalize_ir(computation, _cache_key.IgnoreCallbacks.NO)  # pylint: disable=protected-access
    if len(program) > (8 << 20):   # constants baked in: keeping it would hold their memory
      return None
    digest = hashlib.sha256(program + compile_options.SerializeAsString()).hexdigest()
    return digest, tuple(d.id for d in devices.flat), id(backend)

  def compile_or_reuse(backend, computation, devices, compile_options, host_callbacks,
                       executable_devices, pgle_profiler=None):
    args = (backend, computation, devices, compile_options, host_callbacks,
            executable_devices, pgle_profiler)
    if host_callbacks or pgle_profiler is not None:
      return original(*args)
    try:
      key = key_of(computation, devices, compile_options, backend)
    except Exception:  # pylint: disable=broad-except  (another jaxlib: compile as usual)
      key = None
    if key is None:
      return original(*args)
    if key in executables:
      executables.move_to_end(key)
    else:
      executables[key] = original(*args)
      if len(executables) > 128:   # bounds the worker's memory
        executables.popitem(last=False)
    return executables[key]

  _compiler.compile_or_get_cached = compile_or_reuse


if os.environ.get("RRCM_TEST_COMPILE_MEMO", "1") != "0":
  _memoize_compilation()

# Recorded reference data (tests/testdata/README.md says what each file holds);
# RRCM_REFERENCE_DIR points the tests at another recording with the same layout.
REFERENCE_DIR = os.environ.get("RRCM_REFERENCE_DIR") or os.path.join(os.path.dirname(__file__), "testdata")


def reference_file(name):
  """Path of a recorded reference file (tests/testdata/ or $RRCM_REFERENCE_DIR)."""
  return os.path.join(REFERENCE_DIR, name)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests that start subprocesses")


def pytest_collection_modifyitems(config, items):
  """Files with end-to-end (`slow`) tests run first, each file's tests in their order.

  With `pytest -n 2 --dist loadfile` (./run.sh test) a worker takes a whole file at a
  time, so its module fixtures and compiled programs serve all its tests; the long files
  starting first leave the short ones to even out the two workers at the end.
  """
  del config
  heavy = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in heavy)   # stable: the order within a file stays


def subprocess_xla_flags(devices=1):
  """XLA_FLAGS for a child process: `devices` simulated CPU devices (1: XLA's own default)
  and this suite's back-end optimization level (see above)."""
  flags = [f for f in os.environ["XLA_FLAGS"].split() if f.startswith("--xla_backend_optimization")]
  if devices != 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)
