r"""Inference cost of certification: rRCM's one classifier call against DDS's denoise + classify.

  python -m benchmarks.inference_cost [--datasets fashion_mnist,fashion_mnist_replication,...]
                                      [--seconds 5] [--quick]

Randomized smoothing classifies n noisy copies of every image (n = 100,000
for the paper's certificates), so the cost of one noisy sample decides what
certification costs. For each dataset two base classifiers are compared:

* rRCM: the ViT encoder with its linear head, called once on the noisy
  image (Fashion-MNIST demo size; RCM-B patch 4 at 32 for CIFAR-10; RCM-B
  patch 16 at 224 for ImageNet; configs/common.py's setups);
* DDS (docs/method.md, "Diffusion denoised smoothing"): one U-Net call at t*,
  clamp, resize, classifier: `fashion_mnist_small` + the Fashion-MNIST demo
  ViT (at clean conditioning) at 28, and the replication's
  `fashion_mnist_tiny` + its ViT; `cifar10_uncond_50M_500K` at 32 +
  Hugging Face ViT-B/16 at 224; `256x256_diffusion_uncond` at 224 + BEiT-L/16
  at 512 (`rrcm_jax.pretrained_classifiers`).

Per noisy sample it reports XLA's FLOPs (`jax.jit(f).lower(...).compile()
.cost_analysis()["flops"]` of the per-chunk logits function, divided by the
chunk), the matmul FLOPs read from the jaxpr (every dot_general and
convolution, 2 per multiply-add: the convention of the DDS authors' PyTorch
count, which covers matmuls, convolutions and attention), rRCM's analytic
`rrcm_jax.flops.forward_flops`, and noisy samples/s of the compiled per-chunk
function on this machine (the sampler adds 2-4 % for noise and counting,
benchmarks/README.md). Weights are random: the cost does not depend on them.
Writes benchmarks/results/inference_cost.json and prints a Markdown table.
"""
import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report, timing
from configs import common
from rrcm_jax import classifier, flops, models, pretrained_classifiers, smoothing
from rrcm_jax.diffusion import dds
from rrcm_jax.diffusion import train as diffusion_train

SIGMA = 0.5           # pixel space; sets the rRCM grid point and DDS's t* (cost is the same for any)
NUM_SCALES = 80       # the rRCM classifier's noise-level grid
N_CERTIFY = 100_000   # CERTIFY's estimation samples (plus N0 = 100 selection samples)
N0 = 100
DATASETS = ("fashion_mnist", "fashion_mnist_replication", "cifar10", "imagenet")
# (rRCM setup, classes, chunk), (DDS denoiser, DDS classifier or None = the rRCM ViT, chunk).
# fashion_mnist_replication: the replication's ViT and DDS arm (experiments/replication.py)
# at its certification chunks, so its cost ratio is measured in one run, not read off logs
# written at different loads.
PAIRS = {
    "fashion_mnist": (("fashion_mnist", 10, 32), ("fashion_mnist_small", None, 8)),
    "fashion_mnist_replication": (("fashion_mnist_replication", 10, 1000),
                                  ("fashion_mnist_tiny", None, 32)),
    "cifar10": (("cifar10_rcmb", 10, 8), ("cifar10_uncond_50M_500K", "hf_vit_b16_cifar10", 2)),
    "imagenet": (("imagenet_rcmb", 1000, 2),
                 ("256x256_diffusion_uncond", "beit_large_patch16_512", 1)),
}
DDS_RESOLUTION = {"imagenet": 224}   # DDS denoises ImageNet's 224×224 crops with the 256 model
# The DDS authors' PyTorch counts (GFLOPs, 2 per multiply-add, matmuls/convs/attention).
PAPER_GFLOPS = {"cifar10": dict(rRCM=11.4, DDS=51.9),
                "imagenet": dict(rRCM=35.3, DDS=1712.6 + 724.0)}


# ----------------------------------------------------------------------------
# FLOP counts.
# ----------------------------------------------------------------------------
# One counter for the package and this benchmark: the jaxpr's matmuls and convolutions.
matmul_flops = diffusion_train.matmul_flops


def xla_flops(compiled):
  """XLA's 'flops' of a compiled function (`Compiled.cost_analysis()`)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


# ----------------------------------------------------------------------------
# Models with random weights.
# ----------------------------------------------------------------------------
def random_params(init_fn, *args, seed=0):
  """Parameters shaped like init_fn(key, *args)'s, drawn on the host (no init compile).

  Kernels and tables ~ N(0, 1/fan_in), biases 0, norm scales 1, layer-scale
  gammas 0.1: activations keep their scale, so no inf/NaN changes the timing.
  """
  shapes = jax.eval_shape(init_fn, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if leaf.ndim >= 2:
      fan_in = math.prod(leaf.shape[:-1])
      return (rng.standard_normal(leaf.shape, np.float32) / math.sqrt(fan_in)).astype(leaf.dtype)
    if "scale" in name:
      return np.ones(leaf.shape, leaf.dtype)
    if "bias" in name:
      return np.zeros(leaf.shape, leaf.dtype)
    return np.full(leaf.shape, 0.1, leaf.dtype)   # layer-scale gammas
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _rrcm_vit(setup, num_classes, dtype):
  """(model config, Classifier module, params) of an rRCM classifier computing in `dtype`."""
  if setup == "fashion_mnist_replication":
    from configs import fashion_mnist_replication  # pylint: disable=g-import-not-at-top
    cfg = fashion_mnist_replication.model_config().copy_and_resolve_references()
  else:
    cfg = common.setup(setup).model.copy_and_resolve_references()
  cfg.dtype = dtype
  module = models.classifier(cfg, num_classes, final_norm=False)
  x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
  params = random_params(module.init, x, jax.ShapeDtypeStruct((1,), jnp.float32))["params"]
  return cfg, module, params


def build_rrcm(dataset, dtype="float32"):
  """dict(name, logits_fn(params, x_model), params, shape, analytic) of the rRCM classifier."""
  (setup, num_classes, chunk), _ = PAIRS[dataset]
  cfg, module, params = _rrcm_vit(setup, num_classes, dtype)
  logits_fn = classifier.make_smoothing_logits_fn(module, NUM_SCALES, SIGMA,
                                                  common.denoiser_config())
  return dict(dataset=dataset, method="rRCM", chunk=chunk, logits_input="noisy",
              num_classes=num_classes,
              name=f"rRCM {setup} (ViT width {cfg.width}, depth {cfg.depth}, patch "
                   f"{cfg.patch_size}, {cfg.image_size}px)",
              logits_fn=logits_fn, params=params,
              shape=(cfg.image_size, cfg.image_size, cfg.channels),
              analytic_flops=flops.forward_flops(cfg, num_classes))


def _dds_classifier(dataset, name, dtype):
  """(classifier_fn(params, x_model), params, resolution or None, classes, analytic FLOPs or
  None) of DDS's classifier."""
  if name is None:   # the demo's own ViT at clean conditioning (no noise left after denoising)
    (setup, num_classes, _), _ = PAIRS[dataset]
    cfg, module, params = _rrcm_vit(setup, num_classes, dtype)
    predict = classifier.level_logits_fn(module, NUM_SCALES, common.denoiser_config())
    return ((lambda p, x: predict(p, x, 0.0)), params, None, num_classes,
            flops.forward_flops(cfg, num_classes))
  clf = pretrained_classifiers.pretrained_classifier(name, dtype)
  params = random_params(clf.network.init, clf.input_spec())["params"]
  # mean = std = 0.5: the network's normalized input is model space, what DDS hands it.
  return ((lambda p, x: clf.network.apply({"params": p}, x)), params,
          clf.preprocess.resolution, clf.num_classes, None)


def build_dds(dataset, dtype="float32"):
  """dict(name, logits_fn(params, x, eps), params, shape, ...) of the DDS base classifier."""
  _, (denoiser, classifier_name, chunk) = PAIRS[dataset]
  unet, step = dds.preset_unet_and_step(denoiser, SIGMA, dtype=models.compute_dtype(dtype))
  size = DDS_RESOLUTION.get(dataset, dds.DDS_PRESETS[denoiser]["image_size"])
  shape = (size, size, unet.in_channels)
  unet_params = random_params(unet.init, jax.ShapeDtypeStruct((1,) + shape, jnp.float32),
                              jax.ShapeDtypeStruct((1,), jnp.float32))
  classifier_fn, classifier_params, resolution, num_classes, classifier_flops = _dds_classifier(
      dataset, classifier_name, dtype)
  side = resolution or size
  parts = dict(   # (function, per-sample arguments): the matmul count split by part
      denoiser=(lambda p, x_t: dds.denoise(unet, p, x_t, step),
                (unet_params, jax.ShapeDtypeStruct((1,) + shape, jnp.float32))),
      classifier=(classifier_fn, (classifier_params, jax.ShapeDtypeStruct(
          (1, side, side, unet.in_channels), jnp.float32))))
  return dict(dataset=dataset, method="DDS", chunk=chunk, logits_input="clean_and_noise",
              num_classes=num_classes,
              name=f"DDS {denoiser} at {size}px + {classifier_name or 'its rRCM ViT'}"
                   f" at {resolution or size}px",
              logits_fn=dds.make_logits_fn(unet, classifier_fn, step, resolution),
              params=dict(denoiser=unet_params, classifier=classifier_params), shape=shape,
              analytic_flops=None, classifier_analytic_flops=classifier_flops, parts=parts)


# ----------------------------------------------------------------------------
# Measurement.
# ----------------------------------------------------------------------------
def chunk_inputs(spec, chunk, seed=0):
  """The per-chunk logits function's inputs for one image, drawn by the sampler itself."""
  pixels = np.random.default_rng(seed).uniform(size=(1,) + spec["shape"]).astype(np.float32)
  sampler = smoothing.Sampler(spec["logits_fn"], 2, SIGMA, chunk_size=chunk,
                              logits_input=spec["logits_input"])
  if spec["logits_input"] == "noisy":
    return (sampler.noisy_inputs(pixels, [0], smoothing.ESTIMATION_STREAM, 0, chunk),)
  return sampler.clean_and_noise(pixels, [0], smoothing.ESTIMATION_STREAM, 0, chunk)


def cost(spec, chunk=None):
  """FLOPs per noisy sample of `spec`'s logits function: XLA's and the jaxpr's matmul count.

  Returns (row dict, compiled per-chunk function, its inputs).
  """
  chunk = chunk or spec["chunk"]
  inputs = chunk_inputs(spec, chunk)
  params = spec["params"] = jax.device_put(spec["params"])   # drops the host copy
  start = time.perf_counter()
  compiled = jax.jit(spec["logits_fn"]).lower(params, *inputs).compile()
  row = dict(dataset=spec["dataset"], method=spec["method"], model=spec["name"], chunk=chunk,
             compile_s=time.perf_counter() - start,
             xla_flops=xla_flops(compiled) / chunk,
             matmul_flops=matmul_flops(spec["logits_fn"], params, *inputs) / chunk,
             analytic_flops=spec.get("analytic_flops"),
             params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec["params"])))
  for part, (fn, part_args) in spec.get("parts", {}).items():
    row[f"{part}_matmul_flops"] = matmul_flops(fn, *part_args)
  if "parts" in spec:   # DDS: what is left is the bicubic resize (its weights are matmuls)
    row["resize_matmul_flops"] = (row["matmul_flops"] - row["denoiser_matmul_flops"]
                                  - row["classifier_matmul_flops"])
  return row, compiled, (params,) + tuple(inputs)


def throughput(compiled, args, chunk, seconds):
  """Noisy samples/s of the compiled per-chunk function: the best call of those fitting in
  `seconds` after an untimed one (a call longer than `seconds` is timed once, not warmed up).

  `samples_per_cpu_s` divides by this process's CPU seconds instead: on a shared machine
  it counts only the time the computation received (benchmarks/timing.py).
  """
  times = [timing.timed(lambda: jax.block_until_ready(compiled(*args)))]
  deadline = time.perf_counter() + seconds
  while time.perf_counter() < deadline:
    times.append(timing.timed(lambda: jax.block_until_ready(compiled(*args))))
  best = timing.best(times[1:] or times)
  return dict(samples_per_s=chunk / best.wall, samples_per_cpu_s=chunk / best.cpu,
              timed_calls=len(times) - 1 or 1, load_average=report.load_average())


def sampler_throughput(spec, params, chunk, seconds):
  """Noisy samples/s of `smoothing.Sampler.dispatch_counts` end to end (noise on the device,
  the logits function, counts) for one image, in `spec`'s logits_input mode."""
  sampler = smoothing.Sampler(spec["logits_fn"], spec["num_classes"], SIGMA, chunk_size=chunk,
                              logits_input=spec["logits_input"])
  pixels = np.random.default_rng(0).uniform(size=(1,) + spec["shape"]).astype(np.float32)
  run = lambda num: sampler.dispatch_counts(params, pixels, [0], smoothing.ESTIMATION_STREAM,
                                            num).block_until_ready()
  start = time.perf_counter()
  run(chunk)                                   # compiles
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  run(chunk)
  calls = max(1, int(seconds / (time.perf_counter() - start)))
  start = time.perf_counter()
  run(calls * chunk)
  return dict(sampler_samples_per_s=calls * chunk / (time.perf_counter() - start),
              sampler_compile_s=compile_s, sampler_traces=sampler.trace_count)


def measure(dataset, seconds, timed=True, chunk=None, dtype="float32", with_sampler=False):
  """The rRCM and DDS rows of one dataset, with samples/s when `timed` (and through the
  sampler when `with_sampler`); `chunk` overrides the per-model chunk sizes."""
  rows = []
  for build in (build_rrcm, build_dds):
    spec = build(dataset, dtype)
    row, compiled, args = cost(spec, chunk)
    row["dtype"] = dtype
    if spec.get("classifier_analytic_flops"):
      row["classifier_analytic_flops"] = spec["classifier_analytic_flops"]
    if timed:
      row.update(throughput(compiled, args, row["chunk"], seconds))
      row["seconds_per_image"] = (N_CERTIFY + N0) / row["samples_per_s"]
      row["gflops_per_s"] = row["matmul_flops"] * row["samples_per_s"] / 1e9
    del compiled, args
    if with_sampler:
      row.update(sampler_throughput(spec, spec["params"], row["chunk"], seconds))
    row["paper_gflops"] = PAPER_GFLOPS.get(dataset, {}).get(row["method"])
    rows.append(row)
    print(f"{row['model']}: {row['xla_flops'] / 1e9:.2f} GFLOP (XLA), "
          f"{row['matmul_flops'] / 1e9:.2f} (matmuls), "
          f"{row.get('samples_per_s', float('nan')):.2f} samples/s", flush=True)
    del spec
  rrcm, dds_row = rows
  for key in ("xla_flops", "matmul_flops", "samples_per_s", "sampler_samples_per_s"):
    if key in rrcm:
      ratio = dds_row[key] / rrcm[key]
      dds_row[f"ratio_{key}"] = 1 / ratio if "samples_per_s" in key else ratio
  return rows


COLUMNS = [("dataset", "dataset", "{}"), ("method", "method", "{}"),
           ("xla_gflops", "GFLOP/sample (XLA)", "{:.3f}"),
           ("matmul_gflops", "GFLOP/sample (matmuls)", "{:.3f}"),
           ("analytic_gflops", "analytic", "{:.3f}"), ("paper_gflops", "PyTorch count (DDS authors)", "{:.1f}"),
           ("samples_per_s", "samples/s", "{:.2f}"),
           ("samples_per_cpu_s", "per CPU-s", "{:.2f}"),
           ("sampler_samples_per_s", "samples/s (Sampler)", "{:.2f}"),
           ("seconds_per_image", "s per image (n=1e5)", "{:,.0f}"),
           ("ratio", "DDS/rRCM (matmul FLOPs, time)", "{}")]


def markdown(rows):
  """The Markdown table of the rows (GFLOPs per noisy sample)."""
  lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
           "| " + " | ".join("---" if k in ("dataset", "method") else "---:"
                              for k, _, _ in COLUMNS) + " |"]
  for row in rows:
    view = dict(row, xla_gflops=row["xla_flops"] / 1e9, matmul_gflops=row["matmul_flops"] / 1e9,
                analytic_gflops=row["analytic_flops"] and row["analytic_flops"] / 1e9)
    if "ratio_matmul_flops" in row:
      timed = row.get("ratio_samples_per_s")
      view["ratio"] = f"{row['ratio_matmul_flops']:.1f}× / " + (f"{timed:.1f}×" if timed else "-")
    lines.append("| " + " | ".join("-" if view.get(k) is None else f.format(view[k])
                                    for k, _, f in COLUMNS) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--datasets", default=",".join(DATASETS))
  parser.add_argument("--seconds", type=float, default=5.0,
                      help="timing per model after one untimed call")
  parser.add_argument("--chunk", type=int, default=None,
                      help="noisy samples per call for every model (default: per model, CPU sizes)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--sampler", nargs="?", const="all", default="",
                      help="also time smoothing.Sampler end to end (compiles each model again) "
                           "for these datasets (comma-separated; bare: all)")
  parser.add_argument("--no-timing", action="store_true", help="FLOP counts only")
  parser.add_argument("--quick", action="store_true", help="the Fashion-MNIST pair (tests)")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results)")
  args = parser.parse_args(argv)
  datasets = ["fashion_mnist"] if args.quick else [d for d in args.datasets.split(",") if d]
  unknown = sorted(set(datasets) - set(DATASETS))
  if unknown:
    raise ValueError(f"--datasets {unknown} are not among {list(DATASETS)}.")
  seconds = 0.2 if args.quick else args.seconds
  rows = []
  for dataset in datasets:
    with_sampler = args.sampler == "all" or dataset in args.sampler.split(",")
    rows += measure(dataset, seconds, not args.no_timing, args.chunk, args.dtype, with_sampler)
  table = markdown(rows)
  print(table)
  path = report.write_results("inference_cost", dict(
      rows=rows, sigma=SIGMA, n=N_CERTIFY, n0=N0, dtype=args.dtype, table=table), args.out)
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
