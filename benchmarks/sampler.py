r"""Certification sampler throughput: noisy samples classified per second.

  python -m benchmarks.sampler [--models fashion_mnist,cifar] [--chunks 16,32,64,128,256,512]
                               [--dtype float32] [--profile] [--quick]

For each model and chunk size (noisy samples per jitted call, one image):
`Sampler.dispatch_counts` (noise drawn on the device, c_in/τ conditioning
at the grid point nearest 2σ, classifier, argmax, counts) is timed to
completion, and so is a bare jitted forward `logits_fn(params, x)` of the
same batch of noisy inputs (the reference: no noise, no counting). Achieved
FLOP/s use the analytic forward FLOPs (`rrcm_jax.flops.forward_flops`, 2 per
multiply-add, attention included) and are stated as a fraction of the
matrix-multiply rate measured in turns with them (`benchmarks.matmul`), so
that a burst of load from other processes hits both alike.

`--profile` traces the bare forward of the best chunk with `jax.profiler`
and splits the executed XLA thunk time by what each fused kernel computes
(matmuls with the LayerNorm/bias fused into them by XNNPACK/YNNPACK, GELU,
softmax, transposes and copies, other elementwise), plus XLA's own cost
analysis of the compiled forward. Parameters are random: throughput does
not depend on the weights. Writes benchmarks/results/sampler.json.
"""
import argparse
import collections
import functools
import glob
import gzip
import math
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report, timing
from benchmarks import matmul
from configs import common, fashion_mnist_pretrain, imagenet_pretrain_rcmb
from rrcm_jax import classifier, models, smoothing
from rrcm_jax.flops import forward_flops

SIGMA = 0.25        # pixel space; the classifier is conditioned at the grid point nearest 2σ
NUM_SCALES = 80     # the icm schedule's final N (the classifier's grid)
NUM_CLASSES = {"tiny": 10, "fashion_mnist": 10, "cifar": 10, "rcmb": 1000}
IDX_IMAGES = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"   # Debian package


def model_config(name, dtype="float32", attention=None):
  """The model section of a benchmark model.

  tiny: a 1-block ViT for tests; fashion_mnist: configs/fashion_mnist_pretrain.py;
  cifar: the CIFAR-size ViT (width 192, depth 6, 3 heads, patch 4, 32×32, 66
  tokens); rcmb: ViT-B/16 at 224 (configs/imagenet_pretrain_rcmb.py, 198 tokens).
  """
  if name == "tiny":
    cfg = common.model_config(width=32, depth=1, num_heads=2, patch_size=7, image_size=28,
                              channels=1, proj_hidden=64, proj_out=32)
  elif name == "fashion_mnist":
    cfg = fashion_mnist_pretrain.get_config().model
  elif name == "cifar":
    cfg = common.model_config(width=192, depth=6, num_heads=3, patch_size=4, image_size=32,
                              channels=3)
  elif name == "rcmb":
    cfg = imagenet_pretrain_rcmb.get_config().model
  else:
    raise ValueError(f"model must be one of {sorted(NUM_CLASSES)}, got {name!r}.")
  cfg = cfg.copy_and_resolve_references()
  cfg.dtype = dtype
  cfg.attention = attention
  return cfg


def build(name, dtype="float32", attention=None, seed=0):
  """(model config, logits_fn, params, flops per sample) of a randomly initialized classifier."""
  cfg = model_config(name, dtype, attention)
  model = models.classifier(cfg, NUM_CLASSES[name], final_norm=False)
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels))
  params = jax.jit(model.init)(jax.random.key(seed), x, jnp.zeros((1,)))["params"]
  logits_fn = classifier.make_smoothing_logits_fn(model, NUM_SCALES, SIGMA,
                                                  common.denoiser_config())
  return cfg, logits_fn, params, forward_flops(cfg, NUM_CLASSES[name])


def _run_sampler(sampler, params, pixels, indices, num):
  sampler.dispatch_counts(params, pixels, indices, smoothing.ESTIMATION_STREAM,
                          num).block_until_ready()


def measure(name, chunks, dtype="float32", attention=None, rounds=3, seconds=1.0, images=1,
            matmul_sizes=None):
  """Rows {model, chunk, samples_per_s, fraction, forward_...} for each chunk size.

  `fraction`: FLOP/s over the matmul rate timed in turns with it (wall clock);
  `fraction_cpu`: the same per CPU-second of this process (robust to other
  processes' load on a shared CPU); `fraction_of_best`: over the best matmul
  rate of the whole run (conservative).
  """
  cfg, logits_fn, params, flops = build(name, dtype, attention)
  mm_dtype = "float32" if jax.default_backend() == "cpu" else dtype
  matmul_sizes = matmul_sizes or matmul.default_sizes()
  mm_fn, mm_flops = matmul.product_timer(matmul_sizes[0], mm_dtype)
  best_rate = matmul.matmul_rate(mm_dtype, matmul_sizes, repeats=3)
  shape = (images, cfg.image_size, cfg.image_size, cfg.channels)
  pixels = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
  indices = np.arange(images)
  forward = jax.jit(logits_fn)
  rows = []
  for chunk in chunks:
    sampler = smoothing.Sampler(logits_fn, NUM_CLASSES[name], SIGMA, chunk_size=chunk)
    # Enough chunks per timing for about `seconds` of work at the matmul rate.
    calls = max(1, math.ceil(seconds * best_rate / (flops * chunk * images)))
    num = calls * chunk
    x_model = sampler.noisy_inputs(pixels, indices, smoothing.ESTIMATION_STREAM, 0, chunk)
    runs = dict(
        matmul=mm_fn,
        sampler=functools.partial(_run_sampler, sampler, params, pixels, indices, num),
        forward=lambda x=x_model: forward(params, x).block_until_ready())
    t = timing.interleaved_best(runs, rounds=rounds)
    best_rate = max(best_rate, mm_flops / t["matmul"].wall)
    rows.append(dict(
        model=name, dtype=dtype, chunk=chunk, images=images,
        samples_per_s=num * images / t["sampler"].wall,
        gflops=num * images * flops / t["sampler"].wall / 1e9,
        **timing.efficiency(num * images * flops, t["sampler"], mm_flops, t["matmul"]),
        forward_samples_per_s=chunk * images / t["forward"].wall,
        **timing.efficiency(chunk * images * flops, t["forward"], mm_flops, t["matmul"],
                                prefix="forward_"),
        matmul_gflops=mm_flops / t["matmul"].wall / 1e9, traces=sampler.trace_count,
        load_average=report.load_average()))
  for row in rows:
    row["fraction_of_best"] = row["gflops"] * 1e9 / best_rate
  return rows, dict(flops_per_sample=flops, best_matmul_gflops=best_rate / 1e9,
                    tokens=(cfg.image_size // cfg.patch_size) ** 2 + 2)


# ----------------------------------------------------------------------------
# Where the time goes: thunk time of the compiled forward by kernel kind.
# ----------------------------------------------------------------------------
def _computations(hlo_text):
  """{computation name: its body lines} of an HLO module's text."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
    if head and line.rstrip().endswith("{"):
      current = head.group(1)
      bodies[current] = []
    elif line.startswith("}"):
      current = None
    elif current:
      bodies[current].append(line)
  return bodies


def _called_text(bodies, line, depth=3):
  """The text of the computations an instruction calls (fusions, while bodies), nested."""
  callees = re.findall(r"(?:calls|body|to_apply)=%([\w.\-]+)", line)
  if not callees or depth == 0:
    return line
  return "\n".join([line] + [_called_text(bodies, inner, depth - 1)
                             for callee in callees for inner in bodies.get(callee, [])])


def kernel_kinds(hlo_text):
  """{instruction name: kind} for every top-level instruction of a compiled module."""
  bodies, kinds = _computations(hlo_text), {}
  entry = re.search(r"^ENTRY %(\S+) ", hlo_text, re.M)
  # Top-level thunks only: a while loop's event spans its body's thunks (no double count).
  for lines in ([bodies[entry.group(1)]] if entry else bodies.values()):
    for line in lines:
      inst = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
      if not inst:
        continue
      body = _called_text(bodies, line)
      if " dot(" in body or " convolution(" in body:
        kind = "matmul (+fused LN, bias, softmax)"
      elif "threefry" in body or " shift-right-logical(" in body or "erf_inv" in body:
        kind = "noise (threefry, erf-inv)"   # before GELU: erf_inv's metadata says "erf"
      elif "erf" in body:
        kind = "GELU (erf)"
      elif " exponential(" in body:
        kind = "softmax"
      elif " reduce(" in body:
        kind = "reductions (LayerNorm)"
      elif " transpose(" in body or " copy(" in body:
        kind = "transposes, copies"
      else:
        kind = "other elementwise"
      kinds[inst.group(1)] = kind
  return kinds


def profile(compiled, run_once, calls=4):
  """Shares of executed thunk time by kernel kind of a compiled computation, and XLA's
  cost analysis (flops, bytes accessed) per call.

  Args:
    compiled: `jax.jit(f).lower(...).compile()`: its HLO names the kernels.
    run_once: runs `compiled` once and blocks (threads any donated state).
  """
  kinds = kernel_kinds(compiled.as_text())
  for _ in range(2):
    run_once()
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(calls):
      run_once()
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(
        glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
  totals = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in kinds:
          totals[kinds[event.name]] += event.duration_ns
  total = sum(totals.values()) or 1
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(shares={k: round(v / total, 4) for k, v in totals.most_common()},
              thunk_ms_per_call=total / calls / 1e6,
              xla_flops_per_call=float(cost.get("flops", 0.0)),
              xla_bytes_per_call=float(cost.get("bytes accessed", 0.0)))


def profile_forward(name, chunk, dtype="float32", attention=None):
  cfg, logits_fn, params, flops = build(name, dtype, attention)
  x = jax.random.normal(jax.random.key(0), (chunk, cfg.image_size, cfg.image_size, cfg.channels))
  compiled = jax.jit(logits_fn).lower(params, x).compile()
  out = profile(compiled, lambda: compiled(params, x).block_until_ready())
  out.update(model=name, chunk=chunk, analytic_flops_per_call=flops * chunk)
  return out


# ----------------------------------------------------------------------------
# bfloat16 vs float32: do the two base classifiers agree on noisy inputs?
# ----------------------------------------------------------------------------
def fashion_mnist_test_images(count, path=IDX_IMAGES):
  """(uint8 [count, 28, 28, 1], int labels [count]): the first Fashion-MNIST test images
  from the Debian package's IDX files (dataset-fashion-mnist)."""
  with gzip.open(path) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:count]
  with gzip.open(str(path).replace("images-idx3", "labels-idx1")) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)[:count]
  return images, labels.astype(np.int64)


def load_images(path, count):
  """Test images for the agreement check: an .npz with "images" (uint8 NHWC) and "labels",
  or the Fashion-MNIST IDX images file (.gz)."""
  if str(path).endswith(".npz"):
    data = np.load(path)
    return data["images"][:count], data["labels"][:count]
  return fashion_mnist_test_images(count, path)


def agreement(workdir, images, labels, sigma=SIGMA, samples=256, which="last", chunk=64,
              dtypes=("float32", "bfloat16")):
  """How often the bfloat16 and float32 versions of a trained classifier predict the same
  class on the same noisy inputs x + σε (pixel space σ).

  Args:
    workdir: a fine-tuning workdir (`rrcm_jax.classifier.load_classifier`).
    images: uint8 [m, H, W, C] test images; labels: [m].
    samples: noisy samples per image (noise as the Sampler draws it: image i is
      keyed by its position i here).
    chunk: noisy samples per image per call (a call classifies chunk·m inputs).
    dtypes: the compute dtypes compared (the reference first).

  Returns:
    dict: agreement (fraction of the m·samples noisy inputs on which the two
    predict the same class), the reference's accuracy on them (evidence that
    the classifier is trained), the number of images whose majority vote
    (the smoothed prediction) differs, and the sizes.
  """
  _, params, info = classifier.load_classifier(workdir, which)
  fns = []
  for dtype in dtypes:
    cfg = info["model"].copy_and_resolve_references()
    cfg.dtype = dtype
    model = models.classifier(cfg, info["num_classes"], info["final_norm"])
    logits_fn = classifier.make_smoothing_logits_fn(model, info["num_scales"], sigma,
                                                    info["denoiser"])
    fns.append(jax.jit(lambda p, x, f=logits_fn: jnp.argmax(f(p, x), -1)))
  sampler = smoothing.Sampler(fns[0], info["num_classes"], sigma, chunk_size=chunk)
  m, labels = len(images), np.asarray(labels)
  votes = np.zeros((2, m, info["num_classes"]), np.int64)
  same = correct = 0
  for start in range(0, samples, chunk):
    n = min(chunk, samples - start)
    x = sampler.noisy_inputs(images, np.arange(m), smoothing.ESTIMATION_STREAM, start, n)
    preds = [np.asarray(fn(params, x)).reshape(n, m) for fn in fns]   # sample-major rows
    same += int(np.sum(preds[0] == preds[1]))
    correct += int(np.sum(preds[0] == labels[None]))
    for k, p in enumerate(preds):
      np.add.at(votes[k], (np.broadcast_to(np.arange(m), p.shape), p), 1)
  total = samples * m
  return dict(workdir=str(workdir), which=which, sigma=sigma, dtypes=list(dtypes), images=m,
              samples_per_image=samples, noisy_inputs=total, agreement=same / total,
              reference_noisy_accuracy=correct / total,
              majority_votes_differ=int(np.sum(votes[0].argmax(-1) != votes[1].argmax(-1))),
              classifier_step=info["step"], num_scales=info["num_scales"])


COLUMNS = [("model", "model", "{}"), ("dtype", "dtype", "{}"), ("chunk", "chunk", "{}"),
           ("samples_per_s", "samples/s", "{:.1f}"), ("gflops", "GFLOP/s", "{:.1f}"),
           ("fraction", "of matmul", "{:.1%}"), ("fraction_cpu", "per CPU-s", "{:.1%}"),
           ("fraction_of_best", "of best", "{:.1%}"),
           ("forward_samples_per_s", "fwd samples/s", "{:.1f}"),
           ("forward_fraction", "fwd of matmul", "{:.1%}"),
           ("forward_fraction_cpu", "fwd per CPU-s", "{:.1%}"),
           ("matmul_gflops", "matmul GFLOP/s", "{:.1f}"), ("load_average", "load", "{:.2f}")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="fashion_mnist,cifar")
  parser.add_argument("--chunks", default="16,32,64,128,256,512")
  parser.add_argument("--dtype", default="float32", choices=sorted(matmul.DTYPES))
  parser.add_argument("--attention", default=None, choices=["xla", "cudnn"])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--seconds", type=float, default=1.0, help="work per timed sampler call")
  parser.add_argument("--profile", action="store_true", help="profile the best chunk's forward")
  parser.add_argument("--agreement", default=None,
                      help="a fine-tuning workdir: measure bfloat16 vs float32 agreement")
  parser.add_argument("--agreement-images", default=IDX_IMAGES,
                      help="test images: .npz (images, labels) or Fashion-MNIST IDX .gz")
  parser.add_argument("--agreement-count", type=int, default=100, help="test images")
  parser.add_argument("--agreement-samples", type=int, default=512, help="noisy samples each")
  parser.add_argument("--quick", action="store_true", help="tiny model, two chunks (tests)")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results)")
  args = parser.parse_args(argv)
  matmul_sizes = None
  if args.quick:
    args.models, args.chunks, args.rounds, args.seconds = "tiny", "8,16", 1, 0.05
    matmul_sizes = (256,)
  chunks = [int(c) for c in args.chunks.split(",")]
  rows, per_model, profiles = [], {}, []
  for name in [m for m in args.models.split(",") if m]:   # --models "": agreement only
    model_rows, info = measure(name, chunks, args.dtype, args.attention, args.rounds,
                                 args.seconds, matmul_sizes=matmul_sizes)
    rows += model_rows
    per_model[name] = info
    if args.profile:
      best = max(model_rows, key=lambda r: r["forward_fraction"])
      profiles.append(profile_forward(name, best["chunk"], args.dtype, args.attention))
  agree = None
  if args.agreement:
    images, labels = load_images(args.agreement_images, args.agreement_count)
    agree = agreement(args.agreement, images, labels, samples=args.agreement_samples)
  if rows:
    print(report.format_table(rows, COLUMNS))
  if agree:
    print(f"{agree['dtypes'][1]} vs {agree['dtypes'][0]} on {agree['noisy_inputs']} noisy inputs "
          f"(sigma {agree['sigma']}): "
          f"agreement {agree['agreement']:.4%}, {agree['dtypes'][0]} noisy accuracy "
          f"{agree['reference_noisy_accuracy']:.1%}, majority votes differ on "
          f"{agree['majority_votes_differ']} of {agree['images']} images")
  for p in profiles:
    shares = ", ".join(f"{k} {v:.1%}" for k, v in p["shares"].items())
    print(f"profile {p['model']} chunk {p['chunk']}: {shares}; XLA counts "
          f"{p['xla_flops_per_call'] / p['analytic_flops_per_call']:.2f}x the analytic FLOPs")
  path = report.write_results("sampler", dict(rows=rows, models=per_model,
                                                  profiles=profiles, agreement=agree), args.out)
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
