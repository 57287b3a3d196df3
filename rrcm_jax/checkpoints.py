"""Orbax checkpoints that resume by themselves, and preemption (SIGTERM) handling.

Layout: <workdir>/checkpoints/<step>/{state, meta}. One manager keeps the
two newest checkpoints (written every `latest_every` steps, the frequent
"latest" ones; two, so that a damaged newest one has a fallback) plus every
checkpoint whose step is a multiple of `save_every` (kept for good). Orbax writes into a temporary directory and renames it when complete,
so an interrupted write is never restored. With several processes every
process calls `save`; Orbax writes each array once, cooperatively.

Every checkpoint carries <step>/rrcm_manifest.json, the size and SHA-256 of
each of its files, written once Orbax has finished the step's files and
before it commits the step, so a committed checkpoint always has one.
Restoring verifies it: a checkpoint that fails (truncated or overwritten
file, missing file, garbage metadata) is moved aside to <step>.corrupt, one
sentence names the step and the file, and the newest verified older one is
restored; when none is intact, one sentence and the run stops.
"""
import collections
import contextlib
import hashlib
import json
import math
import os
import signal
import sys

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


def absolute(workdir):
  """Orbax wants absolute paths: a relative local workdir is made absolute, gs:// kept."""
  workdir = str(workdir)
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


MANIFEST = "rrcm_manifest.json"
CORRUPT_SUFFIX = ".corrupt"
# Orbax writes commit_success.txt and rewrites _CHECKPOINT_METADATA (the commit time) when
# it commits a step, after the manifest; neither holds arrays or meta.
_NOT_HASHED = frozenset({"commit_success.txt", "_CHECKPOINT_METADATA", MANIFEST,
                         MANIFEST + ".tmp"})
_READ_CHUNK = 1 << 22


class CheckpointDamaged(ValueError):
  """No intact checkpoint to resume from; the message is one sentence naming steps and files."""
  exit_code = 65   # EX_DATAERR of sysexits.h: a distinct status for scripts and schedulers


def _checkpoint_files(root):
  """Sorted '/'-separated paths, relative to `root`, of the files a manifest covers."""
  stack, found = [(root, "")], []
  while stack:
    directory, prefix = stack.pop()
    for child in directory.iterdir():
      if child.is_dir():
        stack.append((child, f"{prefix}{child.name}/"))
      elif child.name not in _NOT_HASHED:
        found.append(prefix + child.name)
  return sorted(found)


def _size_and_sha256(path):
  digest, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    while chunk := f.read(_READ_CHUNK):
      digest.update(chunk)
      size += len(chunk)
  return size, digest.hexdigest()


def write_manifest(step_dir, step):
  """Writes <step_dir>/rrcm_manifest.json ({file: [size, sha256]}) under a temporary
  name first, so a manifest is either complete or absent."""
  files = {name: list(_size_and_sha256(step_dir / name)) for name in _checkpoint_files(step_dir)}
  temporary = step_dir / (MANIFEST + ".tmp")
  temporary.write_text(json.dumps(dict(step=int(step), algorithm="sha256", files=files), indent=1))
  temporary.rename(step_dir / MANIFEST)


def verify_manifest(step_dir):
  """None when every file of the manifest of `step_dir` has its recorded size and SHA-256;
  otherwise "<file>: <what is wrong>" for the first that does not."""
  try:
    files = json.loads((step_dir / MANIFEST).read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError):
    return f"{MANIFEST}: unreadable"
  for name, (size, sha256) in sorted(files.items()):
    path = step_dir / name
    if not path.exists():
      return f"{name}: missing"
    found_size, found_sha256 = _size_and_sha256(path)
    if found_size != size:
      return f"{name}: {found_size} bytes, {size} written"
    if found_sha256 != sha256:
      return f"{name}: its SHA-256 differs from the one recorded at save time"
  return None


class Checkpointer:
  """Saves and restores `{state, meta}` (`meta` a JSON-able dict), checksummed.

  Keeps the newest `keep` checkpoints (two by default, so that a damaged newest
  one has an intact predecessor) plus every multiple of `save_every`.
  `notices` collects the one-sentence warnings restoring printed (fallbacks).
  """

  def __init__(self, workdir, save_every=None, latest_every=None, subdir="checkpoints",
               keep=2):
    self.directory = absolute(workdir) / subdir
    self.notices = []
    self._pending = collections.deque()   # steps whose manifest Orbax's finalization writes
    self._saved = None
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=latest_every or save_every or 1, max_to_keep=keep,
        keep_period=save_every, create=True, enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifests))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    """The newest committed step (verified when this process saved it), or None."""
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step, state, meta=None, force=False):
    """Saves when the interval says so (or `force`); returns whether it did."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
    self._pending.append(int(step))
    saved = self.manager.save(int(step), args=args, force=force)
    if saved:
      self._saved = int(step)
    elif self._pending and self._pending[-1] == int(step):
      self._pending.pop()
    return saved

  def _write_manifests(self):
    """Orbax's post-finalization callback (its save thread): the step's files are
    complete and not yet committed (still in <step>.orbax-checkpoint-tmp* on local
    disks; on object stores Orbax writes <step>/ and commits with a marker file)."""
    step = self._pending.popleft()   # one call per save, in order; later saves may be queued
    if jax.process_index() == 0:
      temporary = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
      write_manifest(temporary[-1] if temporary else self.directory / str(step), step)

  def verify(self, step):
    """None when checkpoint `step` matches its manifest, else "<file>: <what is wrong>"."""
    return verify_manifest(self.directory / str(step))

  def has_manifest(self, step):
    return (self.directory / str(step) / MANIFEST).exists()

  def newest_verified_step(self, move_aside=False):
    """The newest step that passes verification (None when there are no checkpoints).

    Each newer step that fails gets a one-sentence notice and, with `move_aside`
    (a run resuming into this directory), is renamed <step>.corrupt so that the
    run can save those steps again. Steps written before checksums existed (no
    manifest) are accepted unverified, with a notice. Raises CheckpointDamaged
    when every checkpoint fails.
    """
    steps = sorted(self.all_steps(), reverse=True)
    damaged, found = [], None
    for step in steps:
      if not self.has_manifest(step):
        self._notice(f"checkpoint step {step} in {self.directory} carries no checksums "
                     "(written before rrcm-jax recorded them), so it is restored unverified.")
        found = step
        break
      problem = self.verify(step)
      if problem is None:
        found = step
        break
      damaged.append((step, problem))
    moved = self._move_aside([step for step, _ in damaged]) if move_aside and damaged else {}
    if damaged and found is None:
      listing = "; ".join(f"step {step}: {problem}" for step, problem in damaged)
      raise CheckpointDamaged(
          f"no checkpoint in {self.directory} is intact ({listing}); put back an intact copy, or "
          "move the directory aside to start again from step 0.")
    for step, problem in damaged:
      where = f"moved it to {moved[step]}" if step in moved else "left it in place"
      self._notice(f"checkpoint step {step} in {self.directory} failed verification ({problem}); "
                   f"{where} and restoring step {found}, the newest verified checkpoint.")
    return found

  def verified_step(self, step=None):
    """`step` if it passes verification (CheckpointDamaged if not), or with None the
    newest verified step (None when there are no checkpoints); for readers of another
    run's checkpoints, which never move anything aside."""
    if step is None:
      return self.newest_verified_step()
    if self.has_manifest(step) and (problem := self.verify(step)) is not None:
      raise CheckpointDamaged(f"checkpoint step {step} in {self.directory} failed verification "
                              f"({problem}).")
    return step

  def _notice(self, text):
    self.notices.append(text)
    if jax.process_index() == 0:
      print(f"warning: {text}", file=sys.stderr, flush=True)

  def _move_aside(self, steps):
    """Renames each step directory to <step>.corrupt (process 0); {step: new path}."""
    moved = {}
    for step in steps:
      target = self.directory / f"{step}{CORRUPT_SUFFIX}"
      suffix = 1
      while target.exists():
        target, suffix = self.directory / f"{step}{CORRUPT_SUFFIX}.{suffix}", suffix + 1
      if jax.process_index() == 0:
        try:
          (self.directory / str(step)).rename(target)
        except Exception as e:  # pylint: disable=broad-except  (object stores may refuse)
          # left in place it would stop every later save at or below its step
          raise CheckpointDamaged(
              f"checkpoint step {step} in {self.directory} failed verification and could not "
              f"be moved aside ({e}); move or delete it, then rerun.") from None
      moved[step] = target
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("rrcm_checkpoints_moved_aside")
    self.manager.reload()
    return moved

  def restore(self, abstract_state, step=None):
    """Restores (state, meta) of `step`, by default of the newest verified checkpoint
    (moving damaged newer ones aside), or returns None when there is no checkpoint."""
    step = self.newest_verified_step(move_aside=True) if step is None else self.verified_step(step)
    if step is None:
      return None
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              meta=ocp.args.JsonRestore())
    if self.has_manifest(step):
      with reading(self.directory, step):
        restored = self.manager.restore(step, args=args)
    else:   # unverified: a read error is the only sign of damage
      try:
        restored = self.manager.restore(step, args=args)
      except Exception as e:  # pylint: disable=broad-except
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointDamaged(f"checkpoint step {step} in {self.directory} (without checksums) "
                                f"could not be read ({first}).") from None
    return restored["state"], restored["meta"]

  def restore_meta(self, step=None):
    """The meta dict of `step` (default: the newest verified checkpoint), or None."""
    step = self.newest_verified_step() if step is None else step
    if step is None:
      return None
    with reading(self.directory, step):
      args = ocp.args.Composite(meta=ocp.args.JsonRestore())
      return self.manager.restore(step, args=args)["meta"]

  def wait(self):
    """Blocks until the pending save is committed (with its manifest)."""
    self.manager.wait_until_finished()
    if (self._saved is not None and jax.process_index() == 0
        and (self.directory / str(self._saved)).exists() and not self.has_manifest(self._saved)):
      raise RuntimeError(f"checkpoint step {self._saved} in {self.directory} was committed without "
                         f"its {MANIFEST}; this Orbax version finalizes saves differently.")

  def close(self):
    self.wait()
    self.manager.close()


def check_finite(pending, ckpt, keys=("loss", "grad_norm", "param_norm")):
  """Raises at the first of `pending` [(step, metrics)] whose loss, gradient norm or new
  parameter norm is not finite, before that state can be checkpointed."""
  for step, m in pending:
    values = {k: float(m[k]) for k in keys if k in m}
    if not all(math.isfinite(v) for v in values.values()):
      raise FloatingPointError(
          f"training diverged at step {step} ({', '.join(f'{k}={v}' for k, v in values.items())}); "
          f"the newest verified checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is "
          "intact.")


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


# ----------------------------------------------------------------------------
# Reading another run's workdir: its config and parts of its checkpoints.
# ----------------------------------------------------------------------------
def read_config(workdir):
  """The config.json a run wrote into its workdir, as a ConfigDict (or ValueError)."""
  path = epath.Path(workdir) / "config.json"
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable run config ({e}).") from None


def resolve_checkpoint(init_from, key="config.init_from"):
  """(run workdir, step or None) for a workdir, its checkpoints/ or checkpoints/<step>."""
  path = epath.Path(init_from)
  if not path.exists():
    raise ValueError(f"{key}={init_from} does not exist.")
  candidates = [(path, None)]
  if path.name == "checkpoints":
    candidates.append((path.parent, None))
  if path.name.isdigit() and path.parent.name == "checkpoints":
    candidates.append((path.parent.parent, int(path.name)))
  for workdir, step in candidates:
    if (workdir / "config.json").exists() and (workdir / "checkpoints").is_dir():
      return workdir, step
  raise ValueError(f"{key}={init_from} is not a checkpoint: expected a run workdir with "
                   "config.json and checkpoints/ (or its checkpoints/ or checkpoints/<step>).")


def complete_step(ckpt, step, source):
  """The requested (or newest verified) complete checkpoint step of `ckpt`, or ValueError;
  CheckpointDamaged when the requested step (or every step) fails its manifest, so that a
  reader never reads a damaged step. Nothing is moved aside (another run's checkpoints)."""
  if step is not None and step not in ckpt.all_steps():
    raise ValueError(f"{source} has no complete checkpoint at step {step}.")
  step = ckpt.verified_step(step)
  if step is None:
    raise ValueError(f"{source} has no complete checkpoint.")
  return step


@contextlib.contextmanager
def reading(directory, step):
  """Turns an Orbax or TensorStore error while restoring checkpoint `step` of `directory`
  into one sentence (ValueError): a verified checkpoint that does not restore was written
  for another model or optimizer layout."""
  try:
    yield
  except CheckpointDamaged:
    raise
  except Exception as e:  # pylint: disable=broad-except  (Orbax and TensorStore raise many types)
    first = " ".join((str(e).strip().splitlines() or [type(e).__name__])[0].split())[:300]
    raise ValueError(f"checkpoint step {step} in {directory} could not be restored into this "
                     f"run's state ({first}); it was written with other model or optimizer "
                     "settings, or is damaged.") from e


def restore_subtrees(workdir, subdir, target, step, source):
  """Reads only `target` (abstract subtrees of a saved TrainState, e.g.
  {"ema_params": {"vit": ...}}, with shardings) and the meta of checkpoint
  `step` (None: the newest); no optimizer state or other copy is read."""
  ckpt = Checkpointer(workdir, subdir=subdir)
  try:
    step = complete_step(ckpt, step, source)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with reading(ckpt.directory, step):
      restored = ckpt.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True),
          meta=ocp.args.JsonRestore()))
  finally:
    ckpt.close()
  return restored["state"], restored["meta"]
