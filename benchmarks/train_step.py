r"""Pre-training step throughput: images/s and the fraction of the matmul rate.

  python -m benchmarks.train_step [--configs fashion_mnist,cifar] [--steps 8] [--quick]
                                  [--no-pipeline]

For each config, the jitted `pretrain_step.make_train_step` (six encoder calls on
the batch: three online calls with gradients, one online call without, two
target calls; InfoNCE, AdamW, target and EMA updates, the state donated) is
timed on a batch already on the device, in turns with the matrix-multiply
rate (`benchmarks.matmul`). FLOPs per image are 12 forward-equivalents
(`flops.training_flops("pretrain", ...)`: a forward with its backward
counts 3, a forward alone 1) of the analytic forward with the projection
head. A second row runs the same step end to end: uint8 views from
`rrcm_jax.data.pipelines.pretrain_batches` (the "synthetic" source, or
Fashion-MNIST when `--data-dir` holds it prepared) through
`prefetch_to_device`; it is skipped, with the reason, where TensorFlow is
not installed (an accelerator host without TF).

Configs: fashion_mnist (configs/fashion_mnist_pretrain.py, batch 128); cifar
(the CIFAR-size ViT: width 192, depth 6, 3 heads, patch 4, 32×32, projection
2048 → 256, batch 64); rcmb (configs/imagenet_pretrain_rcmb.py, ViT-B/16 at
224, bfloat16; --batch sets the per-device batch, --remat per block); tiny
(tests). Writes benchmarks/results/train_step.json.
"""
import argparse
import time

import jax
import numpy as np

from benchmarks import report, timing
from benchmarks import matmul, sampler
from configs import cifar10_pretrain_rcmb, common, fashion_mnist_pretrain, imagenet_pretrain_rcmb
from rrcm_jax import flops, models, optim, parallel, pretrain_step

CONFIGS = ("tiny", "fashion_mnist", "cifar", "rcmb")


def pretrain_config(name, batch=None, dtype=None, remat=None, devices=1):
  """The pre-training config of a benchmark case (global batch = per-device × devices)."""
  if name in ("tiny", "fashion_mnist"):
    config = fashion_mnist_pretrain.get_config()
    if name == "tiny":
      config.model = common.model_config(width=32, depth=1, num_heads=2, patch_size=7,
                                         image_size=28, channels=1, proj_hidden=64, proj_out=32)
      config.batch_size = 16
  elif name == "cifar":
    config = cifar10_pretrain_rcmb.get_config()
    config.model = common.model_config(width=192, depth=6, num_heads=3, patch_size=4,
                                       image_size=32, channels=3, proj_hidden=2048, proj_out=256)
    config.batch_size = 64
  elif name == "rcmb":
    config = imagenet_pretrain_rcmb.get_config()
    config.batch_size = 64 * devices
  else:
    raise ValueError(f"config must be one of {list(CONFIGS)}, got {name!r}.")
  if batch:
    config.batch_size = batch * devices
  if dtype:
    config.model.dtype = dtype
  if remat is not None:
    config.model.remat = remat
  return config


def setup(config, mesh, batch):
  """(compiled step, fresh state, compiled per-device memory in GB) on `mesh`.

  The step is compiled once, ahead of time, for `batch`; the memory figures
  are its `memory_analysis()` (peak = arguments + outputs − donated + temp).
  """
  pretrain_step.validate_config(config, mesh)
  model = models.rcm_encoder(config.model)
  tx = optim.pretrain_optimizer(config)
  state, shardings = pretrain_step.create_state(config, model, tx, mesh)
  step = pretrain_step.make_train_step(config, model, tx, mesh, shardings)
  compiled = step.lower(state, batch, jax.random.key(0)).compile()
  stats = compiled.memory_analysis()
  peak = None
  if stats is not None:
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes + stats.temp_size_in_bytes) / 1e9
  return compiled, state, peak


def random_views(config, rng):
  """{"x", "a1", "a2"}: uint8 [batch, S, S, C] random pixels (as the pipelines give)."""
  m = config.model
  shape = (config.batch_size, m.image_size, m.image_size, m.channels)
  return {k: rng.integers(0, 256, shape, dtype=np.uint8) for k in ("x", "a1", "a2")}


class Stepper:
  """Runs `steps` train steps per call on a fixed device batch (state carried over)."""

  def __init__(self, step_fn, state, batch, steps):
    self.step_fn, self.state, self.batch, self.steps = step_fn, state, batch, steps
    self.key = jax.random.key(0)

  def __call__(self):
    for _ in range(self.steps):
      self.state, metrics = self.step_fn(self.state, self.batch, self.key)
    jax.block_until_ready(metrics)
    if not np.isfinite(float(metrics["loss"])):
      raise FloatingPointError("the benchmark's train step produced a non-finite loss.")


def on_device_row(name, config, mesh, steps, rounds, matmul_sizes):
  """Images/s of the step on a batch already on the device, with its matmul fraction."""
  batch = parallel.global_batch(random_views(config, np.random.default_rng(0)), mesh)
  step_fn, state, peak_gb = setup(config, mesh, batch)
  stepper = Stepper(step_fn, state, batch, steps)
  mm_dtype = "float32" if jax.default_backend() == "cpu" else config.model.dtype
  mm_fn, mm_flops = matmul.product_timer(matmul_sizes[0], mm_dtype)
  # A timed step call lasts seconds on a CPU, a matmul call a tenth: more matmul samples.
  t = timing.interleaved_best(dict(matmul=mm_fn, step=stepper), rounds=rounds,
                                  repeats=dict(matmul=5, step=1))
  per_image = flops.training_flops("pretrain", config.model, 1)
  images = config.batch_size * steps
  return dict(config=name, mode="on device", batch=config.batch_size, dtype=config.model.dtype,
              remat=bool(config.model.remat), devices=mesh.devices.size,
              images_per_s=images / t["step"].wall,
              gflops=images * per_image / t["step"].wall / 1e9,
              **timing.efficiency(images * per_image, t["step"], mm_flops, t["matmul"]),
              matmul_gflops=mm_flops / t["matmul"].wall / 1e9, flops_per_image=per_image,
              peak_gb=peak_gb, load_average=report.load_average()), stepper


def profile_step(name, stepper):
  """Where the step's time goes (`benchmarks.sampler.profile`), state threaded through."""
  def run_once():
    stepper.state, metrics = stepper.step_fn(stepper.state, stepper.batch, stepper.key)
    jax.block_until_ready(metrics)
  out = sampler.profile(stepper.step_fn, run_once, calls=2)
  out.update(config=name, batch=stepper.batch["x"].shape[0])
  return out


def pipeline_row(name, config, mesh, stepper, steps, data_dir=None):
  """Images/s end to end: pretrain_batches -> prefetch_to_device -> the step."""
  try:
    from rrcm_jax.data import pipelines  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return dict(config=name, mode="with pipeline", skipped=f"no input pipeline here ({e})")
  data = config.data.copy_and_resolve_references()
  if data_dir:
    data.data_dir = data_dir
  else:
    data.name = "synthetic"
    data.synthetic_examples = {"train": 4096}
  batches = pipelines.prefetch_to_device(
      pipelines.pretrain_batches(data, global_batch_size=config.batch_size, seed=0),
      parallel.data_sharding(mesh))
  key = jax.random.key(0)
  for _ in range(2):   # warm-up: the pipeline's first batches, autotune
    stepper.state, metrics = stepper.step_fn(stepper.state, next(batches), key)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    stepper.state, metrics = stepper.step_fn(stepper.state, next(batches), key)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  return dict(config=name, mode="with pipeline", batch=config.batch_size,
              dtype=config.model.dtype, source=data.name,
              images_per_s=config.batch_size * steps / seconds,
              load_average=report.load_average())


COLUMNS = [("config", "config", "{}"), ("mode", "mode", "{}"), ("batch", "batch", "{}"),
           ("dtype", "dtype", "{}"), ("images_per_s", "images/s", "{:.1f}"),
           ("gflops", "GFLOP/s", "{:.1f}"), ("fraction", "of matmul", "{:.1%}"),
           ("fraction_cpu", "per CPU-s", "{:.1%}"), ("matmul_gflops", "matmul GFLOP/s", "{:.1f}"),
           ("peak_gb", "peak GB", "{:.2f}"), ("load_average", "load", "{:.2f}")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="fashion_mnist,cifar")
  parser.add_argument("--steps", type=int, default=2, help="steps per timed call")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--batch", type=int, default=None, help="per-device batch (override)")
  parser.add_argument("--dtype", default=None, choices=sorted(matmul.DTYPES))
  parser.add_argument("--remat", action="store_true", help="jax.checkpoint per block")
  parser.add_argument("--no-pipeline", action="store_true", help="skip the end-to-end rows")
  parser.add_argument("--data-dir", default=None, help="TFDS data_dir with the config's dataset")
  parser.add_argument("--devices", type=int, default=None, help="mesh size (default: all)")
  parser.add_argument("--profile", action="store_true", help="where the step's time goes")
  parser.add_argument("--quick", action="store_true", help="tiny config, one round (tests)")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results)")
  args = parser.parse_args(argv)
  matmul_sizes = matmul.default_sizes()
  if args.quick:
    args.configs, args.steps, args.rounds, matmul_sizes = "tiny", 1, 1, (256,)
  mesh = parallel.make_mesh(jax.devices()[:args.devices] if args.devices else None)
  rows, profiles = [], []
  for name in args.configs.split(","):
    config = pretrain_config(name, args.batch, args.dtype, True if args.remat else None,
                             mesh.devices.size)
    row, stepper = on_device_row(name, config, mesh, args.steps, args.rounds, matmul_sizes)
    rows.append(row)
    if args.profile:
      profiles.append(profile_step(name, stepper))
    if not args.no_pipeline:
      rows.append(pipeline_row(name, config, mesh, stepper, args.steps * 2, args.data_dir))
  print(report.format_table([r for r in rows if "skipped" not in r], COLUMNS))
  for r in rows:
    if "skipped" in r:
      print(f"{r['config']} {r['mode']}: skipped, {r['skipped']}")
  for p in profiles:
    shares = ", ".join(f"{k} {v:.1%}" for k, v in p["shares"].items())
    print(f"profile {p['config']} batch {p['batch']}: {shares}")
  path = report.write_results("train_step", dict(rows=rows, profiles=profiles), args.out)
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
