r"""The certification sampler's rate as a ratio to the matmul rate, with its ablations.

  nice -n 10 python -m benchmarks.sampler_ratio [--cases cifar:16,fashion_mnist:32]
                                                [--rounds 9] [--ablate] [--profile] [--quick]

For each case (model:chunk, one image, float32) the 2048² float32 matmul
(`benchmarks.matmul`) and `Sampler.dispatch_counts` are timed in strict
alternation — matmul, sampler, matmul, sampler, … — and each sampler timing
is divided by the matmul timing right before it (analytic FLOPs,
`rrcm_jax.flops.forward_flops`, over the matmul's 2 n³). The medians of
these per-round ratios are printed, from wall-clock seconds and from CPU
seconds of this process: on a shared, loaded machine a median of adjacent
ratios moves much less than either rate alone.

`--ablate` adds, in the same alternation, the pieces of the sampler, so that
their differences say where the time goes:
  forward:   the jitted classifier alone on a ready batch of noisy inputs;
  no_count:  noise, c_in/τ conditioning and classifier, logits summed instead
             of argmax and class counts;
  zero_noise: the sampler with the noise replaced by zeros;
  noise:     the noisy inputs alone (`Sampler.noisy_inputs`), stated as its
             time over the sampler's.
`--profile` adds the executed XLA thunk time of one chunk call by kernel
kind (`benchmarks.sampler.profile`). Parameters are random. Writes
benchmarks/results/sampler_ratio.json.
"""
import argparse
import functools
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import matmul, report, sampler, timing
from rrcm_jax import smoothing

STREAM = smoothing.ESTIMATION_STREAM


def _blocking(fn, *args):
  return lambda: jax.block_until_ready(fn(*args))


def _ablated_sampler(logits_fn, num_classes, chunk, part):
  """A Sampler without one of its parts: "zero_noise" or "no_count"."""
  s = smoothing.Sampler(logits_fn, num_classes, sampler.SIGMA, chunk_size=chunk)
  if part == "no_count":
    # The logits' sum stands in for argmax + counts (keeps the classifier live).
    s._chunk_counts = functools.partial(_sum_counts, s)   # pylint: disable=protected-access
    return s
  s._unit_noise = lambda images, indices, key, stream, start, chunk_size: jnp.zeros(   # pylint: disable=protected-access
      (chunk_size,) + images.shape, jnp.float32)
  return s


def _sum_counts(s, chunk_size, params, counts, start, images, indices, key, stream, num, sigma):
  """`Sampler._chunk_counts` with the logits' sum added to class 0 instead of counts."""
  del num
  s.traces[chunk_size] += 1
  logits, _ = s._logits(params, images, indices, key, stream, start, sigma, chunk_size)   # pylint: disable=protected-access
  total = jnp.sum(logits).astype(jnp.int32)
  return counts.at[:, 0].add(total), start + chunk_size


def case_runs(name, chunk, ablate, work_s, matmul_rate):
  """({name: blocking callable}, {name: FLOPs per call}) of one case."""
  cfg, logits_fn, params, flops = sampler.build(name)
  classes = sampler.NUM_CLASSES[name]
  pixels = np.random.default_rng(0).uniform(
      size=(1, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)
  index = np.arange(1)
  calls = max(1, math.ceil(work_s * matmul_rate / (flops * chunk)))
  num = calls * chunk
  full = smoothing.Sampler(logits_fn, classes, sampler.SIGMA, chunk_size=chunk)
  runs = {"sampler": _blocking(full.dispatch_counts, params, pixels, index, STREAM, num)}
  if ablate:
    for part in ("no_count", "zero_noise"):
      s = _ablated_sampler(logits_fn, classes, chunk, part)
      runs[part] = _blocking(s.dispatch_counts, params, pixels, index, STREAM, num)
    forward = jax.jit(logits_fn)
    x = full.noisy_inputs(pixels, index, STREAM, 0, chunk)
    runs["forward"] = lambda: jax.block_until_ready([forward(params, x) for _ in range(calls)])
    noisy = jax.jit(functools.partial(full._noisy_batch, chunk_size=chunk))   # pylint: disable=protected-access
    images, indices = full._prepare(pixels, index)   # pylint: disable=protected-access
    scalars = [full.replicate((np.int32(STREAM), np.int32(k * chunk), np.float32(full.sigma)))
               for k in range(calls)]
    runs["noise"] = lambda: jax.block_until_ready(
        [noisy(images, indices, full.key, *args) for args in scalars])
  return runs, {k: num * flops for k in runs}, dict(calls=calls, flops_per_sample=flops)


def measure(name, chunk, rounds=9, ablate=False, work_s=0.25, matmul_size=2048):
  """Median per-round ratios to the matmul rate (wall and CPU) of the sampler and its parts."""
  mm, mm_flops = matmul.product_timer(matmul_size)
  mm_rate = matmul.matmul_rate("float32", [matmul_size], repeats=2)
  runs, flops, info = case_runs(name, chunk, ablate, work_s, mm_rate)
  for fn in [mm] + list(runs.values()):   # compile and warm up
    fn()
  ratios = {k: ([], []) for k in runs}
  mm_rates, loads = [], []
  for _ in range(rounds):
    for key, fn in runs.items():
      ref = timing.timed(mm)
      t = timing.timed(fn)
      mm_rates.append(mm_flops / ref.wall)
      ratios[key][0].append((flops[key] / t.wall) / (mm_flops / ref.wall))
      ratios[key][1].append((flops[key] / t.cpu) / (mm_flops / ref.cpu))
    loads.append(report.load_average())
  row = dict(model=name, chunk=chunk, rounds=rounds, matmul_size=matmul_size,
             matmul_gflops_median=statistics.median(mm_rates) / 1e9,
             load_average_median=statistics.median(loads), **info)
  for key, (wall, cpu) in ratios.items():
    row[f"{key}_ratio"] = statistics.median(wall)
    row[f"{key}_ratio_cpu"] = statistics.median(cpu)
  if ablate:   # the noise's share: its time over the sampler's (= ratio inverse)
    row["noise_share"] = row["sampler_ratio"] / row["noise_ratio"]
    row["noise_share_cpu"] = row["sampler_ratio_cpu"] / row["noise_ratio_cpu"]
  return row


def profile_chunk(name, chunk):
  """Shares of one compiled sampler chunk's thunk time by kernel kind."""
  cfg, logits_fn, params, flops = sampler.build(name)
  s = smoothing.Sampler(logits_fn, sampler.NUM_CLASSES[name], sampler.SIGMA, chunk_size=chunk)
  pixels = np.random.default_rng(0).uniform(
      size=(1, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)
  images, indices = s._prepare(pixels, np.arange(1))   # pylint: disable=protected-access
  counts = s.replicate(np.zeros((1, s.num_classes), np.int32))
  args = s.replicate((np.int32(0), np.int32(STREAM), np.int32(2 ** 30), np.float32(s.sigma)))
  start, stream, num, sigma = args
  s.traces[chunk] = 0
  fn = jax.jit(functools.partial(s._chunk_counts, chunk))   # pylint: disable=protected-access
  compiled = fn.lower(params, counts, start, images, indices, s.key, stream, num, sigma).compile()
  once = lambda: jax.block_until_ready(
      compiled(params, counts, start, images, indices, s.key, stream, num, sigma))
  out = sampler.profile(compiled, once)
  out.update(model=name, chunk=chunk, analytic_flops_per_call=flops * chunk)
  return out


COLUMNS = [("model", "model", "{}"), ("chunk", "chunk", "{}"),
           ("sampler_ratio", "sampler/matmul (wall)", "{:.1%}"),
           ("sampler_ratio_cpu", "per CPU-s", "{:.1%}"),
           ("matmul_gflops_median", "matmul GFLOP/s", "{:.1f}"),
           ("load_average_median", "load", "{:.2f}")]
ABLATION_COLUMNS = [("forward_ratio", "forward", "{:.1%}"),
                    ("no_count_ratio", "no counting", "{:.1%}"),
                    ("zero_noise_ratio", "zero noise", "{:.1%}"),
                    ("noise_share", "noise share", "{:.1%}")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default="cifar:16,fashion_mnist:32", help="model:chunk,...")
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--seconds", type=float, default=0.25, help="matmul-seconds per sampler call")
  parser.add_argument("--ablate", action="store_true", help="time the sampler's parts too")
  parser.add_argument("--profile", action="store_true", help="thunk time by kernel kind")
  parser.add_argument("--quick", action="store_true", help="tiny model, 256² matmul (tests)")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results)")
  args = parser.parse_args(argv)
  size = 2048
  if args.quick:
    args.cases, args.rounds, args.seconds, size = "tiny:8", 3, 0.01, 256
  cases = []
  for case in args.cases.split(","):
    name, _, chunk = case.partition(":")
    if name not in sampler.NUM_CLASSES or not chunk.isdigit() or int(chunk) < 1:
      raise ValueError(f"--cases takes model:chunk with model one of {sorted(sampler.NUM_CLASSES)} "
                       f"and chunk a positive integer, got {case!r}.")
    cases.append((name, int(chunk)))
  rows = [measure(n, c, args.rounds, args.ablate, args.seconds, size) for n, c in cases]
  profiles = [profile_chunk(n, c) for n, c in cases] if args.profile else []
  print(report.format_table(rows, COLUMNS + (ABLATION_COLUMNS if args.ablate else [])))
  for p in profiles:
    shares = ", ".join(f"{k} {v:.1%}" for k, v in p["shares"].items())
    print(f"profile {p['model']} chunk {p['chunk']}: {shares}")
  path = report.write_results("sampler_ratio", dict(rows=rows, profiles=profiles), args.out)
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
