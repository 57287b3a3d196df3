"""Timers of the benchmarks: best of several runs, and interleaved timing.

The machines we run on are shared, so a figure is the best of several
repeats (the quietest moment is the closest to what the code can do), and a
reference (the matrix-multiply rate) and a candidate are timed in turns so
that both see the same load. Each timing keeps wall-clock and CPU seconds.
"""
import collections
import time


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
