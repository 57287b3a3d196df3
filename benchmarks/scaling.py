r"""Certification cost scaling: linear in n and in the number of images, flat memory,
one compilation.

  python -m benchmarks.scaling [--ns 1000,10000,100000] [--images 1,2,4,8] [--chunk 256] [--quick]

CERTIFY (`smoothing.certify`: n0 = 100 selection samples, then n estimation
samples, α = 0.001) of Fashion-MNIST-size images with the Fashion-MNIST
classifier (configs/fashion_mnist_pretrain.py model section, random weights:
cost does not depend on them), one image after another as
`rrcm_jax.certify` does. After a first, compiling image:
  * seconds per image for each n (and seconds per noisy sample: constant if
    the cost is linear in n), with a least-squares line a + b·n;
  * seconds for k images at the smallest n ≥ 10⁴ (linear in k);
  * the process's peak resident memory (getrusage max RSS) after each n, the
    bytes of live jax.Arrays, and on accelerators the device's peak bytes in
    use: flat in n, since only chunk-size batches of noise ever exist;
  * `Sampler.trace_count` after the first image and at the end: equal (no
    recompilation per image, per n or per index).
Writes benchmarks/results/scaling.json.
"""
import argparse
import resource
import time

import jax
import numpy as np

from benchmarks import report
from benchmarks import sampler as sampler_bench
from rrcm_jax import smoothing

N0, ALPHA = 100, 0.001


def max_rss_mb():
  """Peak resident set size of this process so far, MB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def live_array_mb():
  """MB held by live jax.Arrays (device buffers this process still references)."""
  return sum(a.nbytes for a in jax.live_arrays()) / 2 ** 20


def device_peak_mb():
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 20


def certify_seconds(sampler, params, images, first_index, n):
  """Wall seconds to CERTIFY `images` [k, H, W, C] one after another."""
  start = time.perf_counter()
  for k, image in enumerate(images):
    smoothing.certify(sampler, params, image, first_index + k, N0, n, ALPHA)
  return time.perf_counter() - start


def linear_fit(xs, ys):
  """(intercept, slope, r²) of the least-squares line through (xs, ys)."""
  xs, ys = np.asarray(xs, float), np.asarray(ys, float)
  slope, intercept = np.polyfit(xs, ys, 1)
  residual = ys - (intercept + slope * xs)
  r2 = 1.0 - float(np.sum(residual ** 2)) / max(float(np.sum((ys - ys.mean()) ** 2)), 1e-30)
  return float(intercept), float(slope), r2


def run(model, ns, image_counts, chunk):
  _, logits_fn, params, _ = sampler_bench.build(model)
  cfg = sampler_bench.model_config(model)
  sampler = smoothing.Sampler(logits_fn, sampler_bench.NUM_CLASSES[model], sampler_bench.SIGMA,
                              chunk_size=chunk)
  shape = (max(image_counts), cfg.image_size, cfg.image_size, cfg.channels)
  images = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
  warm = certify_seconds(sampler, params, images[:1], 0, min(ns))   # compiles n0's and n's chunks
  traces_after_first = sampler.trace_count
  n_rows, index = [], 1
  for n in ns:
    seconds = certify_seconds(sampler, params, images[:1], index, n)
    index += 1
    n_rows.append(dict(n=n, seconds=seconds, seconds_per_sample=seconds / (n + N0),
                       max_rss_mb=max_rss_mb(), live_array_mb=live_array_mb(),
                       device_peak_mb=device_peak_mb(),
                       load_average=report.load_average()))
  n_images = min([n for n in ns if n >= 10_000] or [max(ns)])
  image_rows = []
  for count in image_counts:
    seconds = certify_seconds(sampler, params, images[:count], index, n_images)
    index += count
    image_rows.append(dict(images=count, n=n_images, seconds=seconds,
                           seconds_per_image=seconds / count,
                           load_average=report.load_average()))
  a, b, r2 = linear_fit([r["n"] for r in n_rows], [r["seconds"] for r in n_rows])
  ai, bi, r2i = linear_fit([r["images"] for r in image_rows], [r["seconds"] for r in image_rows])
  rss = [r["max_rss_mb"] for r in n_rows]
  return dict(
      model=model, chunk=chunk, n0=N0, first_image_seconds=warm, n_rows=n_rows,
      image_rows=image_rows,
      fit_n=dict(intercept_s=a, seconds_per_sample=b, r2=r2),
      fit_images=dict(intercept_s=ai, seconds_per_image=bi, r2=r2i),
      rss_growth_mb=rss[-1] - rss[0], traces_after_first_image=traces_after_first,
      traces_at_end=sampler.trace_count, traces=dict(sampler.traces),
      recompiled=sampler.trace_count != traces_after_first)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="fashion_mnist", choices=sorted(sampler_bench.NUM_CLASSES))
  parser.add_argument("--ns", default="1000,10000,100000")
  parser.add_argument("--images", default="1,2,4,8")
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--quick", action="store_true", help="tiny model, small n (tests)")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results)")
  args = parser.parse_args(argv)
  if args.quick:
    args.model, args.ns, args.images, args.chunk = "tiny", "200,1000,3000", "1,2", 64
  result = run(args.model, [int(n) for n in args.ns.split(",")],
               [int(k) for k in args.images.split(",")], args.chunk)
  print(report.format_table(
      result["n_rows"] + result["image_rows"],
      [("n", "n", "{}"), ("images", "images", "{}"), ("seconds", "seconds", "{:.2f}"),
       ("seconds_per_sample", "s/sample", "{:.2e}"), ("seconds_per_image", "s/image", "{:.2f}"),
       ("max_rss_mb", "max RSS MB", "{:.0f}"), ("live_array_mb", "live arrays MB", "{:.2f}"),
       ("device_peak_mb", "device peak MB", "{:.0f}"),
       ("load_average", "load", "{:.2f}")]))
  fit_n, fit_images = result["fit_n"], result["fit_images"]
  print(f"time = {fit_n['intercept_s']:.3f} s + n x {fit_n['seconds_per_sample']:.3e} s "
        f"(r2 {fit_n['r2']:.4f}); per image {fit_images['seconds_per_image']:.3f} s "
        f"(r2 {fit_images['r2']:.4f}); max RSS growth over n {result['rss_growth_mb']:.1f} MB; "
        f"traces after the first image {result['traces_after_first_image']}, "
        f"at the end {result['traces_at_end']}")
  path = report.write_results("scaling", result, args.out)
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
