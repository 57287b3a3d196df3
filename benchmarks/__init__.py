"""Benchmarks of rrcm-jax: each `python -m benchmarks.<name>` prints one table and
writes benchmarks/results/<name>.json.

What every benchmark shares lives here: the timer (best of several, since
the machines we run on are shared and the quietest moment is the closest to
what the code can do), interleaved timing of a reference and a candidate (so
that both see the same load), the machine description written beside every
figure (processor, cores, load average, JAX backend and XLA flags) and the
table / JSON output.
"""
import collections
import json
import os
import pathlib
import platform
import subprocess
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


class Timing(collections.namedtuple("Timing", "wall cpu")):
  """Seconds of one timed call: wall clock, and CPU time of this process (all threads).

  On a shared CPU the wall time includes the time other processes held the
  cores; the CPU time counts only what this process received, so FLOPs per
  CPU-second compare two computations fairly under any load (threads that
  spin while waiting count against the computation, never for it).
  """


def timed(fn):
  """Timing of one blocking call `fn()`."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def best(timings):
  """Elementwise minimum of Timings (the least disturbed wall and CPU figures)."""
  return Timing(min(t.wall for t in timings), min(t.cpu for t in timings))


def best_seconds(fn, repeats=5, warmup=1):
  """Minimum wall time of `fn()` over `repeats` calls after `warmup` calls.

  `fn` must block until its work is done (e.g. end in `.block_until_ready()`).
  """
  for _ in range(warmup):
    fn()
  return best([timed(fn) for _ in range(repeats)]).wall


def interleaved_best(fns, rounds=3, repeats=2):
  """{name: best Timing} of several blocking callables timed in turns.

  Each round times every function `repeats` times (an int, or {name: int}),
  one after the other, so a burst of load from other processes hits all of
  them alike; the minimum over all rounds is kept. Each function is called
  once first (compilation, warm-up) and that call is not timed.
  """
  counts = repeats if isinstance(repeats, dict) else {name: repeats for name in fns}
  for fn in fns.values():
    fn()
  timings = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      timings[name] += [timed(fn) for _ in range(counts[name])]
  return {name: best(t) for name, t in timings.items()}


def efficiency(flops, timing, matmul_flops, matmul_timing, prefix=""):
  """{prefix+"fraction": FLOP/s over the matmul's, wall clock; prefix+"fraction_cpu": the
  same per CPU-second (CPU backend only, else None)} of two Timings measured in turns."""
  import jax  # pylint: disable=g-import-not-at-top
  wall = (flops / timing.wall) / (matmul_flops / matmul_timing.wall)
  cpu = None
  if jax.default_backend() == "cpu" and timing.cpu > 0 and matmul_timing.cpu > 0:
    cpu = (flops / timing.cpu) / (matmul_flops / matmul_timing.cpu)
  return {prefix + "fraction": wall, prefix + "fraction_cpu": cpu}


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
