r"""Pre-training input throughput: the on-device pipeline against tf.data, in images/s.

  python -m benchmarks.input_device [--seconds 10] [--cases fmnist-64,...] [--quick]

Each image becomes the three views x, a1, a2 (docs/method.md, Strong
augmentations). Cases: Fashion-MNIST size (28x28x1) and CIFAR-10 size
(32x32x3), global batch 64 and 256, 10,000 in-memory images each:
  tfdata  `pipelines.pretrain_batches` on the synthetic source with cache=True
          (decoded once into memory, as the Fashion-MNIST and CIFAR-10 configs
          read their data), numpy batches on the host;
  device  `device.DeviceData.pretrain_batches`: the images on the JAX devices,
          gather and views in one jitted program per step, batches left on
          the device (timed until ready).
Both run in this process one after the other, after a warm-up (compilation,
tf.data autotuning). Prints one table with the ratio device / tfdata and the
load average, and writes benchmarks/results/input_device.json.
"""
import argparse
import gc
import json
import os
import pathlib
import platform
import time

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "input_device.json"
CASES = {"fmnist-64": (28, 1, 64), "fmnist-256": (28, 1, 256),
         "cifar-64": (32, 3, 64), "cifar-256": (32, 3, 256)}
QUICK_CASES = {"quick-16": (8, 3, 16)}
NUM_IMAGES = 10_000


def _timed(next_batch, seconds, warmup_seconds):
  """Images/s of next_batch() (returns (images in the batch, something to wait on))."""
  start = time.perf_counter()
  while time.perf_counter() - start < warmup_seconds:
    next_batch()
  count, start, last = 0, time.perf_counter(), None
  while time.perf_counter() - start < seconds:
    n, last = next_batch()
    count += n
  if last is not None and hasattr(last, "block_until_ready"):
    last.block_until_ready()
  return count / (time.perf_counter() - start)


def measure_tfdata(size, channels, batch, seconds, num_images=NUM_IMAGES):
  from configs import common  # pylint: disable=g-import-not-at-top
  from rrcm_jax.data import pipelines  # pylint: disable=g-import-not-at-top
  cfg = common.data_config("synthetic", image_size=size, channels=channels)
  cfg.synthetic_examples = {"train": num_images}
  it = pipelines.pretrain_batches(cfg, global_batch_size=batch, seed=0,
                                  process_index=0, process_count=1)
  def step():
    b = next(it)
    return b["x"].shape[0], None
  rate = _timed(step, seconds, warmup_seconds=max(2.0, seconds / 3))
  del it, step            # stops tf.data's background prefetching before the next measurement
  gc.collect()
  return rate


def measure_device(size, channels, batch, seconds, num_images=NUM_IMAGES):
  import jax  # pylint: disable=g-import-not-at-top
  from rrcm_jax import parallel  # pylint: disable=g-import-not-at-top
  from rrcm_jax.data import device  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_images, size, size, channels), dtype=np.uint8)
  data = device.DeviceData(images, rng.integers(0, 10, num_images), parallel.make_mesh(), seed=0)
  it = data.pretrain_batches(0, batch)
  jax.block_until_ready(next(it))                 # compilation
  def step():
    b = next(it)
    return b["x"].shape[0], b["a2"]
  return _timed(step, seconds, warmup_seconds=max(1.0, seconds / 5))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
  parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
  parser.add_argument("--quick", action="store_true", help="one tiny case, 1 s each (tests)")
  parser.add_argument("--out", default=str(RESULTS), help="where the JSON goes")
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  cases = QUICK_CASES if args.quick else {c: CASES[c] for c in args.cases.split(",")}
  seconds = 1.0 if args.quick else args.seconds
  num_images = 256 if args.quick else NUM_IMAGES
  load_before = os.getloadavg()
  rows = []
  for name, (size, channels, batch) in cases.items():
    tfdata = measure_tfdata(size, channels, batch, seconds, num_images)
    dev = measure_device(size, channels, batch, seconds, num_images)
    rows.append(dict(case=name, image=[size, size, channels], batch=batch, tfdata=round(tfdata, 1),
                     device=round(dev, 1), ratio=round(dev / tfdata, 2)))
  print(f"{'case':11s} {'image':>9s} {'batch':>5s} {'tf.data img/s':>14s} {'device img/s':>13s} {'ratio':>6s}")
  for r in rows:
    print(f"{r['case']:11s} {'x'.join(map(str, r['image'])):>9s} {r['batch']:>5d} {r['tfdata']:>14.0f} "
          f"{r['device']:>13.0f} {r['ratio']:>6.2f}")
  load = [round(x, 2) for x in os.getloadavg()]
  print(f"load average (1, 5, 15 min): before {[round(x, 2) for x in load_before]}, after {load}; "
        f"{os.cpu_count()} CPUs, JAX backend {jax.default_backend()} ({jax.device_count()} device(s))")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(
      rows=rows, seconds=seconds, num_images=num_images,
      machine=dict(cpus=os.cpu_count(), processor=platform.processor() or platform.machine(),
                   load_before=load_before, load_after=load, jax=jax.__version__,
                   backend=jax.default_backend(), devices=jax.device_count(),
                   xla_flags=os.environ.get("XLA_FLAGS", ""))), indent=2))
  print(f"wrote {out}")
  return rows


if __name__ == "__main__":
  main()
