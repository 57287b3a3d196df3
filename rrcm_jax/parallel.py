"""Meshes, shardings, global batches, and multi-host start-up.

Data parallel by default: one mesh axis "data" over every device of every
process; the batch is sharded on it, parameters are replicated and XLA
inserts the gradient all-reduce. With `fsdp=True` parameters and optimizer
state are sharded over the same axis too (ZeRO-3 style) and gathered for use.
"""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def initialize_distributed():
  """Starts jax.distributed when asked to, and only then.

  RRCM_DISTRIBUTED=1: auto-detect the cluster (SLURM, Cloud TPU, ...).
  RRCM_COORDINATOR=host:port with RRCM_NUM_PROCESSES and RRCM_PROCESS_ID:
  explicit (two processes on localhost in the tests). Must run before any
  other JAX call.
  """
  coordinator = os.environ.get("RRCM_COORDINATOR")
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["RRCM_NUM_PROCESSES"]),
                               process_id=int(os.environ["RRCM_PROCESS_ID"]))
  elif os.environ.get("RRCM_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
    jax.distributed.initialize()


def make_mesh(devices=None):
  """A 1-D mesh with axis "data" over `devices` (default: all, every process)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA,))


def data_sharding(mesh):
  """Leading (batch) axis split over "data"."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh):
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, num_shards, min_size):
  """Shards the largest axis divisible by the device count; small arrays stay replicated."""
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh, fsdp=False, min_size=2 ** 14):
  """Shardings for a pytree of arrays: replicated, or FSDP over "data"."""
  n = mesh.shape[DATA]

  def one(leaf):
    if not fsdp or not hasattr(leaf, "shape"):
      return replicated(mesh)
    return NamedSharding(mesh, _fsdp_spec(leaf.shape, n, min_size))

  return jax.tree.map(one, abstract_state)


def check_batch_size(batch_size, mesh, key="batch_size"):
  """The global batch must split evenly over devices and processes."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"config.{key}={batch_size} must be divisible by the number of devices "
                     f"({n}).")
  if batch_size % jax.process_count():
    raise ValueError(f"config.{key}={batch_size} must be divisible by the number of processes "
                     f"({jax.process_count()}).")


def global_batch(local_batch, mesh):
  """Per-process numpy arrays (dict) -> global jax.Arrays sharded on "data"."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local_batch)
