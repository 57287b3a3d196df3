"""The workdir of a run: its records (config, seed, code version), metrics and progress.

Paths go through `etils.epath`, so a `gs://` workdir works like a local one.
Only process 0 writes records and metrics and prints progress.
"""
import json
import subprocess
import sys
import time

import jax
from etils import epath


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


def record_run(workdir, config, argv=None):
  """Writes the resolved config and appends {time, seed, code version, argv, devices, matmul
  precision} to runs.jsonl."""
  path = epath.Path(workdir)
  if jax.process_index() != 0:
    return
  (path / "config.json").write_text(config.to_json_best_effort(indent=2))
  entry = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), seed=config.get("seed"),
               code_version=code_version(), argv=list(argv if argv is not None else sys.argv),
               processes=jax.process_count(), devices=jax.device_count(),
               platform=jax.devices()[0].platform, device_kind=jax.devices()[0].device_kind,
               # None: the backend's default (TF32 for float32 matmuls on recent NVIDIA GPUs)
               matmul_precision=jax.config.jax_default_matmul_precision)
  with (path / "runs.jsonl").open("a") as f:
    f.write(json.dumps(entry) + "\n")


class MetricsWriter:
  """Appends metrics as JSON lines to <workdir>/metrics.jsonl, and to TensorBoard
  event files when TensorFlow and TensorBoard are importable (process 0 only)."""

  def __init__(self, workdir, filename="metrics.jsonl"):
    self.active = jax.process_index() == 0
    self.path = epath.Path(workdir) / filename
    self._tb = None
    if self.active:
      try:
        import tensorboard  # pylint: disable=g-import-not-at-top,unused-import
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        tf.config.set_visible_devices([], "GPU")
        self._tb = tf.summary.create_file_writer(str(epath.Path(workdir) / "tensorboard"))
      except ImportError:
        self._tb = None

  def write(self, step, metrics):
    if not self.active:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    with self.path.open("a") as f:
      f.write(json.dumps(dict(step=int(step), **scalars)) + "\n")
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._tb.as_default(step=int(step)):
        for k, v in scalars.items():
          tf.summary.scalar(k, v)
      self._tb.flush()


def read_metrics(workdir, filename="metrics.jsonl"):
  """All rows of a metrics file, in order."""
  path = epath.Path(workdir) / filename
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    self.start_count, self.start_time = start, time.time()
    self.active = jax.process_index() == 0
    self.tty = sys.stdout.isatty()

  def update(self, count, **fields):
    if not self.active:
      return
    elapsed = max(time.time() - self.start_time, 1e-9)
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
