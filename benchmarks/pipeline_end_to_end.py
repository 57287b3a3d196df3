r"""Pre-training end to end: the device pipeline and tf.data against the step alone.

  nice python -m benchmarks.pipeline_end_to_end [--cases fmnist-64,fmnist-256,cifar-64]
                                                [--rounds 5] [--steps 8] [--quick]

For each case the jitted pre-training step (`pretrain_step.make_train_step`)
is fed three ways, in ONE process, in turns (round-robin, the order rotated
every round), so that a burst of load from other processes hits all three:
  resident  the same uint8 views, already on the device, every step (no input
            work: the step's own rate, the ceiling of the other two);
  device    `device.DeviceData.pretrain_batches` (`data.pipeline = "device"`):
            10,000 random uint8 images on the device, gather and views in one
            jitted program per step, as the trainers run it;
  tfdata    `pipelines.pretrain_batches` on the synthetic source (decoded once
            into memory, cache=True, as the Fashion-MNIST and CIFAR-10 configs
            read their data), made global per step with `parallel.global_batch`
            as `rrcm_jax.pretrain` does (`data.pipeline = "tfdata"`); skipped,
            with the reason, where TensorFlow is missing.
Each timed call runs `--steps` steps and waits for the last; the state is
carried from call to call (one optimizer run). Per round the rates of device
and tfdata are divided by the resident rate of the same round; the table
gives the median rate of each mode, the median of those per-round ratios, their
range, the same ratio per CPU-second of this process (all its threads, tf.data's
included: the figure that holds when other jobs take the cores), and the load
average. Writes benchmarks/results/pipeline_end_to_end.json.

Cases: fmnist-B (configs/fashion_mnist_pretrain.py, 28×28×1, batch B);
cifar-B (32×32×3, a small ViT so that it runs on a CPU: width 96, depth 3,
3 heads, patch 4, projection 512 → 128); rcmb32-B (RCM-B at 32×32, patch 4:
configs/cifar10_pretrain_rcmb.py, for accelerators); tiny-16 (tests).
"""
import argparse
import statistics

import jax
import numpy as np

from benchmarks import report, timing, train_step
from configs import cifar10_pretrain_rcmb, common
from rrcm_jax import models, optim, parallel, pretrain_step
from rrcm_jax.data import device

MODES = ("resident", "device", "tfdata")
NUM_IMAGES = 10_000


def case_config(case):
  """The pre-training config of case "NAME-BATCH" (e.g. "fmnist-256", "cifar-64")."""
  name, _, batch = case.rpartition("-")
  if not batch.isdigit() or name not in ("tiny", "fmnist", "cifar", "rcmb32"):
    raise ValueError(f"case {case!r} must be NAME-BATCH with NAME in tiny, fmnist, cifar, rcmb32 "
                     "and BATCH a positive integer (e.g. fmnist-256).")
  if name in ("tiny", "fmnist"):
    config = train_step.pretrain_config("tiny" if name == "tiny" else "fashion_mnist")
  else:
    config = cifar10_pretrain_rcmb.get_config()
    if name == "cifar":
      config.model = common.model_config(width=96, depth=3, num_heads=3, patch_size=4,
                                         image_size=32, channels=3, proj_hidden=512, proj_out=128)
  config.batch_size = int(batch) * jax.device_count()
  config.knn_every = 0
  return config


def _device_batches(config, mesh, num_images):
  m = config.model
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_images, m.image_size, m.image_size, m.channels), np.uint8)
  data = device.DeviceData(images, rng.integers(0, 10, num_images), mesh, seed=config.seed)
  return data.pretrain_batches(0, config.batch_size)


def _tfdata_batches(config, mesh, num_images):
  """The trainer's tf.data path on synthetic images; (None, reason) without TensorFlow."""
  try:
    from rrcm_jax.data import pipelines  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"no tf.data here ({e})"
  m = config.model
  data = common.data_config("synthetic", image_size=m.image_size, channels=m.channels)
  data.synthetic_examples = {"train": num_images}
  local = pipelines.pretrain_batches(data, global_batch_size=config.batch_size, seed=config.seed)
  return (parallel.global_batch(b, mesh) for b in local), None


class Feeder:
  """Runs `steps` train steps per call, each on next(batches); the state is shared."""

  def __init__(self, shared, batches, steps):
    self.shared, self.batches, self.steps = shared, batches, steps

  def __call__(self):
    s = self.shared
    for _ in range(self.steps):
      s["state"], metrics = s["step"](s["state"], next(self.batches), s["key"])
    jax.block_until_ready(metrics)
    if not np.isfinite(float(metrics["loss"])):
      raise FloatingPointError("the benchmark's train step produced a non-finite loss.")


def measure_case(case, rounds, steps, num_images=NUM_IMAGES, modes=MODES):
  """One row: median images/s per mode and median per-round ratios to "resident"."""
  config = case_config(case)
  mesh = parallel.make_mesh()
  pretrain_step.validate_config(config, mesh)
  model = models.rcm_encoder(config.model)
  tx = optim.pretrain_optimizer(config)
  state, shardings = pretrain_step.create_state(config, model, tx, mesh)
  shared = dict(state=state, key=jax.random.key(0),
                step=pretrain_step.make_train_step(config, model, tx, mesh, shardings))
  resident = parallel.global_batch(train_step.random_views(config, np.random.default_rng(0)), mesh)
  sources = {"resident": iter(lambda: resident, None), "device": None, "tfdata": None}
  skipped = {}
  if "device" in modes:
    sources["device"] = _device_batches(config, mesh, num_images)
  if "tfdata" in modes:
    sources["tfdata"], reason = _tfdata_batches(config, mesh, num_images)
    if reason:
      skipped["tfdata"] = reason
  feeders = {m: Feeder(shared, sources[m], steps) for m in modes if sources[m] is not None}
  for feed in feeders.values():   # compilation, tf.data's first batches and autotuning
    feed()
    feed()
  names, per_round, loads = list(feeders), [], []
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    t = {name: timing.timed(feeders[name]) for name in order}
    per_round.append(t)
    loads.append(report.load_average())
  images = config.batch_size * steps
  row = dict(case=case, image=[config.model.image_size] * 2 + [config.model.channels],
             batch=config.batch_size, width=config.model.width, depth=config.model.depth,
             steps_per_call=steps, rounds=rounds, skipped=skipped,
             load_average=dict(min=min(loads), median=statistics.median(loads), max=max(loads)))
  for name in names:
    rates = [images / t[name].wall for t in per_round]
    row[f"{name}_images_per_s"] = statistics.median(rates)
    row[f"{name}_cpu_s_per_image"] = statistics.median(t[name].cpu / images for t in per_round)
    if name != "resident":
      ratios = [t["resident"].wall / t[name].wall for t in per_round]
      row[f"{name}_ratio"] = statistics.median(ratios)
      row[f"{name}_ratio_range"] = [min(ratios), max(ratios)]
      # Per CPU-second of this process (all threads, tf.data's included): holds under load.
      row[f"{name}_ratio_cpu"] = statistics.median(t["resident"].cpu / t[name].cpu
                                                   for t in per_round)
  return row


COLUMNS = [("case", "case", "{}"), ("batch", "batch", "{}"),
           ("resident_images_per_s", "on device img/s", "{:.1f}"),
           ("device_images_per_s", "device pipeline img/s", "{:.1f}"),
           ("device_ratio", "device / on device", "{:.1%}"),
           ("tfdata_images_per_s", "tf.data img/s", "{:.1f}"),
           ("device_ratio_cpu", "per CPU-s", "{:.1%}"),
           ("tfdata_ratio", "tf.data / on device", "{:.1%}"),
           ("tfdata_ratio_cpu", "per CPU-s", "{:.1%}"),
           ("load", "load (median)", "{:.2f}")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default="fmnist-64,fmnist-256,cifar-64")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=8, help="steps per timed call")
  parser.add_argument("--modes", default=",".join(MODES), help="subset of " + ",".join(MODES))
  parser.add_argument("--quick", action="store_true", help="tiny-16, 2 rounds of 2 steps (tests)")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results)")
  args = parser.parse_args(argv)
  modes = tuple(m for m in args.modes.split(",") if m)
  if set(modes) - set(MODES) or "resident" not in modes:
    raise ValueError(f"--modes {args.modes!r} must be a subset of {','.join(MODES)} "
                     "that includes resident.")
  num_images = NUM_IMAGES
  if args.quick:
    args.cases, args.rounds, args.steps, num_images = "tiny-16", 2, 2, 256
  rows = [measure_case(c, args.rounds, args.steps, num_images, modes)
          for c in args.cases.split(",")]
  print(report.format_table([dict(r, load=r["load_average"]["median"]) for r in rows], COLUMNS))
  for r in rows:
    for mode, reason in r["skipped"].items():
      print(f"{r['case']} {mode}: skipped, {reason}")
  path = report.write_results("pipeline_end_to_end", dict(rows=rows), args.out)
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
