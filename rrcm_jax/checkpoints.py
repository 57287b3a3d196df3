"""Orbax checkpoints that resume by themselves, and preemption (SIGTERM) handling.

Layout: <workdir>/checkpoints/<step>/{state, meta}. One manager keeps the
newest checkpoint (written every `latest_every` steps, the frequent "latest"
one) plus every checkpoint whose step is a multiple of `save_every` (kept for
good). Orbax writes into a temporary directory and renames it when complete,
so an interrupted write is never restored. With several processes every
process calls `save`; Orbax writes each array once, cooperatively.
"""
import math
import os
import signal

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


def absolute(workdir):
  """Orbax wants absolute paths: a relative local workdir is made absolute, gs:// kept."""
  workdir = str(workdir)
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


class Checkpointer:
  """Saves and restores `{state, meta}`; `meta` is a JSON-able dict."""

  def __init__(self, workdir, save_every=None, latest_every=None, subdir="checkpoints",
               keep=1):
    self.directory = absolute(workdir) / subdir
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=latest_every or save_every or 1, max_to_keep=keep,
        keep_period=save_every, create=True, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step, state, meta=None, force=False):
    """Saves when the interval says so (or `force`); returns whether it did."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
    return self.manager.save(int(step), args=args, force=force)

  def restore(self, abstract_state, step=None):
    """Restores (state, meta) of `step` (default the newest complete one), or None."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_meta(self, step=None):
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def check_finite(pending, ckpt, keys=("loss", "grad_norm", "param_norm")):
  """Raises at the first of `pending` [(step, metrics)] whose loss, gradient norm or new
  parameter norm is not finite, before that state can be checkpointed."""
  for step, m in pending:
    values = {k: float(m[k]) for k in keys if k in m}
    if not all(math.isfinite(v) for v in values.values()):
      raise FloatingPointError(
          f"training diverged at step {step} ({', '.join(f'{k}={v}' for k, v in values.items())}); "
          f"the last good checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is intact.")


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings) describing `tree`, for restoring into."""
  if shardings is None:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                       sharding=getattr(a, "sharding", None)), tree)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


class PreemptionWatcher:
  """Turns SIGTERM (how Cloud TPU and SLURM announce preemption) into a flag that
  the training loop checks at step boundaries; all processes agree on it."""

  def __init__(self, sync_every=20):
    self._flag = False
    self.sync_every = sync_every
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._flag = True

  def should_stop(self, step):
    if jax.process_count() > 1:
      try:
        if multihost_utils.reached_preemption_sync_point(int(step)):
          return True
      except RuntimeError:   # preemption service not running: fall back to the signal
        pass
      if step % self.sync_every:   # an all-gather is a barrier: not every step
        return False
      flags = multihost_utils.process_allgather(jax.numpy.asarray(self._flag))
      return bool(flags.any())
    return self._flag

  def restore_handler(self):
    signal.signal(signal.SIGTERM, self._previous)
