"""The workdir of a run: its records (config, seed, code version), metrics and progress.

Paths go through `etils.epath`, so a `gs://` workdir works like a local one.
Only process 0 writes records and metrics and prints progress.

`lock(workdir)` keeps a second run out of a workdir while one runs (a file lock
on local disks, a heartbeat lease on gs://).
"""
import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import jax
from etils import epath

from rrcm_jax import textfiles


def code_version():
  """The git commit of the code that runs (with "+dirty" for local changes), or "unknown".

  Without a git checkout (code shipped as an archive by launch/tpu_pod.sh), the
  commit comes from the CODE_VERSION file the launch script packs beside the package.
  """
  here = epath.Path(__file__).parent
  shipped = here.parent / "CODE_VERSION"
  try:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                         text=True, timeout=10)
    if rev.returncode:
      return shipped.read_text().strip() if shipped.exists() else "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return rev.stdout.strip() + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def ensure_writable(workdir):
  """Creates `workdir` and checks that it can be written to (one-sentence error otherwise)."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"--workdir={workdir} is not writable ({e.strerror or e}); "
                     "give a directory this user can create and write.") from None
  return path


def record_run(workdir, config, argv=None, writer=None):
  """Writes the resolved config and appends {time, seed, code version, argv, devices, matmul
  precision} to runs.jsonl; with a `MetricsWriter`, also the config as hyper-parameters
  (TensorBoard's HParams tab, hparams.json)."""
  path = epath.Path(workdir)
  if jax.process_index() != 0:
    return
  if writer is not None:
    writer.write_hparams(flat_hparams(config))
  (path / "config.json").write_text(config.to_json_best_effort(indent=2))
  entry = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), seed=config.get("seed"),
               code_version=code_version(), argv=list(argv if argv is not None else sys.argv),
               processes=jax.process_count(), devices=jax.device_count(),
               platform=jax.devices()[0].platform, device_kind=jax.devices()[0].device_kind,
               # None: the backend's default (TF32 for float32 matmuls on recent NVIDIA GPUs)
               matmul_precision=jax.config.jax_default_matmul_precision)
  append_line(path / "runs.jsonl", json.dumps(entry))


def append_line(path, line):
  """Appends `line` and a newline to the file at `path` durably, on a local disk or an
  object store (which cannot append: `textfiles.Appender` writes the object again whole)."""
  appender = textfiles.Appender(path)
  try:
    appender.append(line + "\n")
  finally:
    appender.close()


class JsonLinesWriter:
  """Scalars as JSON lines in <workdir>/<filename>, hyper-parameters in hparams.json.

  Has the methods of a CLU `MetricWriter` that the trainers use, so it is one
  writer among CLU's (TensorBoard, logging) when CLU is installed.
  """

  def __init__(self, workdir, filename="metrics.jsonl"):
    self.path = epath.Path(workdir) / filename
    self.hparams_path = epath.Path(workdir) / "hparams.json"

  def write_scalars(self, step, scalars):
    row = dict(step=int(step), **{k: float(v) for k, v in scalars.items()})
    append_line(self.path, json.dumps(row))

  def write_hparams(self, hparams):
    self.hparams_path.write_text(json.dumps(hparams, indent=2, sort_keys=True, default=str))

  def flush(self):
    pass

  def close(self):
    pass


def _clu_writers(workdir):
  """CLU's default writers (TensorBoard + logging); None where CLU or TensorFlow is absent
  (CLU's writers import TensorFlow: GPU machines without it keep the JSON lines only)."""
  try:
    from clu.metric_writers import summary_writer  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return [summary_writer.SummaryWriter(str(epath.Path(workdir) / "tensorboard"))]


class MetricsWriter:
  """Metrics of process 0: <workdir>/metrics.jsonl always, TensorBoard event files through
  CLU when it is installed; written on a background thread (`close` waits for them).

  `write(step, metrics)` takes a dict of scalars; `write_hparams(flat_dict)` records the
  run's hyper-parameters once (TensorBoard's HParams tab, hparams.json).
  """

  def __init__(self, workdir, filename="metrics.jsonl", asynchronous=True):
    self.active = jax.process_index() == 0
    self._writer = None
    if not self.active:
      return
    writers = [JsonLinesWriter(workdir, filename)] + (_clu_writers(workdir) or [])
    try:
      from clu.metric_writers import async_writer, multi_writer  # pylint: disable=g-import-not-at-top
    except ImportError:
      self._writer = _Sequential(writers)
      return
    self._writer = (async_writer.AsyncMultiWriter(writers) if asynchronous
                    else multi_writer.MultiWriter(writers))

  def write(self, step, metrics):
    if self.active:
      self._writer.write_scalars(int(step), {k: float(v) for k, v in metrics.items()})

  def write_hparams(self, hparams):
    if self.active:
      self._writer.write_hparams(dict(hparams))
      self._writer.flush()

  def flush(self):
    if self.active:
      self._writer.flush()

  def close(self):
    """Waits for pending writes; the writer cannot be used afterwards."""
    if self.active and self._writer is not None:
      self._writer.close()
      self._writer = None
      self.active = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _Sequential:
  """Writes to each writer in turn, on the calling thread (when CLU is absent)."""

  def __init__(self, writers):
    self.writers = writers

  def __getattr__(self, name):
    return lambda *args: [getattr(w, name)(*args) for w in self.writers][-1]


def flat_hparams(config):
  """A config as {dotted.key: scalar or str}: what TensorBoard's HParams tab takes."""
  flat = {}
  def visit(prefix, value):
    if hasattr(value, "items"):
      for k, v in value.items():
        visit(f"{prefix}{k}.", v)
    else:
      key = prefix[:-1]
      flat[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
  visit("", config.to_dict() if hasattr(config, "to_dict") else config)
  return flat


def read_metrics(workdir, filename="metrics.jsonl"):
  """All rows of a metrics file, in order; a last line without its newline (cut short by a
  kill or a full disk) is left out."""
  path = epath.Path(workdir) / filename
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


def format_duration(seconds):
  """'1d 01:00:00' for 90,000 s, '00:05:00' for 300 s, '--:--:--' when unknown (inf/nan)."""
  if not seconds == seconds or seconds == float("inf"):
    return "--:--:--"
  days, rest = divmod(int(round(max(seconds, 0))), 86400)
  hours, rest = divmod(rest, 3600)
  clock = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
  return f"{days}d {clock}" if days else clock


class Progress:
  """A progress bar on a terminal, a line per update otherwise (logs, CI); process 0 only."""

  def __init__(self, total, unit="step", start=0, width=30):
    self.total, self.unit, self.width = total, unit, width
    # The rate is measured from the first update on: the steps before it include compiling.
    self.start_count, self.start_time = None, None
    self.active = jax.process_index() == 0
    self.tty = sys.stdout.isatty()

  def update(self, count, **fields):
    if not self.active:
      return
    now = time.time()
    if self.start_time is None:
      self.start_count, self.start_time = count, now
    elapsed = max(now - self.start_time, 1e-9)
    rate = (count - self.start_count) / elapsed
    eta = (self.total - count) / rate if rate > 0 else float("inf")
    done = int(self.width * count / max(self.total, 1))
    bar = "#" * done + "." * (self.width - done)
    extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in fields.items())
    eta_s = format_duration(eta)
    line = f"[{bar}] {self.unit} {count}/{self.total} {extra} ETA {eta_s}"
    if self.tty:
      sys.stdout.write("\r" + line)
      if count >= self.total:
        sys.stdout.write("\n")
    else:
      sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------
# One writer per workdir.
# ----------------------------------------------------------------------------
LOCK_NAME = ".rrcm_lock"


class WorkdirBusy(ValueError):
  """Another run holds the workdir; the message says who (host, pid, since when)."""
  exit_code = 69   # EX_UNAVAILABLE of sysexits.h (75 is a preempted run's)


def _owner_record(token):
  now = time.time()
  return dict(owner=token, host=socket.gethostname(), pid=os.getpid(), since=now, heartbeat=now)


def _busy(workdir, holder):
  if not holder:
    return WorkdirBusy(f"--workdir={workdir} is in use by another run that has not recorded its "
                       "host and pid yet; wait for it to end or use another workdir.")
  since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
  return WorkdirBusy(f"--workdir={workdir} is in use by pid {holder.get('pid')} on host "
                     f"{holder.get('host')} (since {since}); wait for that run to end, stop it, "
                     "or use another workdir.")


class FileLock:
  """An exclusive advisory lock (flock) on <workdir>/.rrcm_lock, for local and NFS disks.

  The kernel releases it when the holding process ends, however it ends, so a
  killed run never leaves a stale lock. The file records the holder (host, pid, since).
  """

  def __init__(self, workdir):
    self.workdir = str(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._fd = None

  def acquire(self):
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      try:
        holder = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
      except ValueError:
        holder = None
      os.close(fd)
      raise _busy(self.workdir, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_owner_record(uuid.uuid4().hex)).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self):
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


class Lease:
  """A lease for object stores (gs://), which have no locks: <workdir>/.rrcm_lock holds
  {owner, host, pid, since, heartbeat}; the holder refreshes the heartbeat every
  `heartbeat_s` seconds, and another run takes the lease over only when the heartbeat
  is older than `stale_s` (the holder died). Object writes are atomic and last-writer-wins,
  so after writing its record a run waits `settle_s` and reads it back: of two runs
  racing for a free lease, only the one whose record stayed proceeds.
  """

  def __init__(self, workdir, heartbeat_s=30.0, stale_s=300.0, settle_s=2.0, clock=time.time):
    if not 0 < heartbeat_s < stale_s:
      raise ValueError(f"heartbeat_s={heartbeat_s} must be > 0 and below stale_s={stale_s}.")
    self.workdir, self.path = str(workdir), epath.Path(workdir) / LOCK_NAME
    self.heartbeat_s, self.stale_s, self.settle_s, self.clock = heartbeat_s, stale_s, settle_s, clock
    self.token, self.lost, self.took_over = uuid.uuid4().hex, False, None
    self._record, self._stop, self._thread = None, threading.Event(), None

  def read(self):
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):   # absent, or torn by a concurrent writer
      return None

  def acquire(self):
    holder = self.read()
    if holder and self.clock() - float(holder.get("heartbeat", 0)) < self.stale_s:
      raise _busy(self.workdir, holder)
    self._record = dict(_owner_record(self.token), since=self.clock(), heartbeat=self.clock())
    self.path.write_text(json.dumps(self._record))
    time.sleep(self.settle_s)
    if (self.read() or {}).get("owner") != self.token:
      raise _busy(self.workdir, self.read())
    if holder:
      self.took_over = holder
      print(f"warning: took over --workdir={self.workdir} from pid {holder.get('pid')} on host "
            f"{holder.get('host')}, whose heartbeat stopped more than {self.stale_s:g} s ago.",
            file=sys.stderr, flush=True)
    self._thread = threading.Thread(target=self._beat, name="rrcm-lease", daemon=True)
    self._thread.start()

  def heartbeat(self):
    """Refreshes the heartbeat; returns False (and sets `lost`) if another run took over."""
    if (self.read() or {}).get("owner") != self.token:
      if not self.lost:
        print(f"warning: another run took over --workdir={self.workdir}; this run no longer "
              "holds it.", file=sys.stderr, flush=True)
      self.lost = True
      return False
    self._record["heartbeat"] = self.clock()
    self.path.write_text(json.dumps(self._record))
    return True

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        if not self.heartbeat():
          return
      except OSError as e:   # a transient store error: the next beat retries
        print(f"warning: lease heartbeat on {self.path} failed ({e}).", file=sys.stderr, flush=True)

  def release(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if (self.read() or {}).get("owner") == self.token:
      self.path.unlink()


@contextlib.contextmanager
def lock(workdir, **lease_options):
  """Holds `workdir` exclusively for the `with` block: a FileLock on local disks, a Lease
  on object stores (gs://, options passed to Lease). Only process 0 of a multi-process
  run takes it (the processes of one run share the workdir). Raises WorkdirBusy (one
  sentence: host, pid, since when) when another run holds it. Yields the lock (or None).
  A local workdir the lock created is removed again when the block leaves nothing but the
  lock file in it (a run that stopped on bad input leaves no trace).
  """
  held, refusal, created = None, None, False
  if jax.process_index() == 0:
    created = "://" not in str(workdir) and not os.path.exists(str(workdir))
    ensure_writable(workdir)   # creates it; one sentence when it cannot be written
    held = Lease(workdir, **lease_options) if "://" in str(workdir) else FileLock(workdir)
    try:
      held.acquire()
    except WorkdirBusy as e:
      refusal = e
  if jax.process_count() > 1:   # every process stops, not only process 0
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if not int(multihost_utils.broadcast_one_to_all(int(refusal is None))):
      raise refusal or WorkdirBusy(f"--workdir={workdir} is in use by another run (process 0 "
                                   "says who).")
  if refusal is not None:
    raise refusal
  if held is None:
    yield None
    return
  try:
    yield held
  finally:
    held.release()
    if created:
      _remove_if_untouched(str(workdir))


def _remove_if_untouched(workdir):
  """Removes `workdir` when it holds nothing but the lock file."""
  try:
    if set(os.listdir(workdir)) <= {LOCK_NAME}:
      if os.path.exists(os.path.join(workdir, LOCK_NAME)):
        os.unlink(os.path.join(workdir, LOCK_NAME))
      os.rmdir(workdir)
  except OSError:   # someone else is using it now: leave it
    pass
