"""What every benchmark writes: the machine description, a plain-text table, JSON.

Every figure is stored with the machine it was measured on (processor, cores,
load average, JAX backend and devices, XLA flags, time) in
benchmarks/results/<name>.json.
"""
import json
import os
import pathlib
import platform
import subprocess
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def load_average():
  """The 1-minute load average (runnable processes), or None where unknown."""
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def cpu_model():
  """The processor's model name (lscpu, else /proc/cpuinfo, else platform)."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine():
  """What a figure was measured on: processor, cores, load, JAX devices, flags."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return dict(
      cpu=cpu_model(), cores=os.cpu_count(), load_average=load_average(),
      backend=jax.default_backend(), device=getattr(device, "device_kind", str(device)),
      device_count=jax.device_count(), jax=jax.__version__,
      xla_flags=os.environ.get("XLA_FLAGS", ""), time=time.strftime("%Y-%m-%d %H:%M:%S"))


def format_table(rows, columns):
  """A plain-text table of `rows` (dicts) with `columns` [(key, header, format)]."""
  cells = [[header for _, header, _ in columns]]
  for row in rows:
    cells.append([("-" if row.get(key) is None else fmt.format(row[key]))
                  for key, _, fmt in columns])
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def write_results(name, payload, path=None):
  """Writes `payload` (with the machine description) as JSON; returns the path.

  Default path: benchmarks/results/<name>.json.
  """
  path = pathlib.Path(path) if path else RESULTS / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = dict(benchmark=name, machine=machine(), **payload)
  path.write_text(json.dumps(payload, indent=2) + "\n")
  return path
