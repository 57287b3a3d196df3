r"""Throughput of the three-view pre-training pipeline, in images/s (each image -> x, a1, a2).

  python -m benchmarks.data_pipeline [--seconds 20] [--cores 1,2]

Cases (the knobs as the pipelines set them: parallel map with AUTOTUNE,
deterministic order, prefetch, decoded images cached in memory where the
config says cache=True):
  32x32   CIFAR-10-like: 10,000 synthetic 32x32x3 images decoded into memory
          (cache=True, as the CIFAR-10 config reads them), then the views;
  28x28   Fashion-MNIST-like: the same at 28x28x1;
  224x224 ImageNet-like: a class folder of 256 JPEGs of 500x375 (the ImageNet
          mean size), read and decoded for every example (cache=False), then
          the views (crops from the full-size image, box-halved when large).
Each case runs in a child process pinned (sched_setaffinity) to 1, 2, ...
cores, so "per core" is a measured figure. Prints one table and writes
benchmarks/results/data_pipeline.json, with the rate an 8-GPU host needs
(the model's FLOPs per image over an assumed accelerator rate, below).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "data_pipeline.json"
CASES = {  # name: (image_size, channels, source, local batch)
    "32x32": (32, 3, "synthetic", 256),
    "28x28": (28, 1, "synthetic", 256),
    "224x224": (224, 3, "folder", 64),
}
# What an 8-GPU host consumes: forward GFLOP per image (docs/method.md, Certification, cost:
# RCM-B at 32x32 p4 ~5.7 GMAC, at 224 p16 ~17.7 GMAC) x 12 forward-equivalents per
# pre-training image (six encoder calls, three with a backward pass at ~2x a forward),
# against 8 x H100 at 989 dense bf16 TFLOP/s and an assumed 40% utilisation.
HOST = dict(gpus=8, peak_tflops=989.0, utilisation=0.4, forward_equivalents=12)
FORWARD_GFLOP = {"32x32": 11.4, "28x28": 11.4, "224x224": 35.4}


def needed_rate(case):
  """Images/s an 8 x H100 host trains RCM-B on, under HOST's assumptions."""
  flops_per_image = FORWARD_GFLOP[case] * 1e9 * HOST["forward_equivalents"]
  return HOST["gpus"] * HOST["peak_tflops"] * 1e12 * HOST["utilisation"] / flops_per_image


def _write_jpeg_folder(root, count=256, size=(500, 375)):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size[1], 0:size[0]]
  for i in range(count):
    d = pathlib.Path(root) / "train" / f"class_{i % 8}"
    d.mkdir(parents=True, exist_ok=True)
    wave = 128 + 80 * np.sin(xx / (5 + i % 13) + yy / (7 + i % 11))[..., None] * rng.uniform(0.5, 1, 3)
    pixels = np.clip(wave + rng.normal(0, 20, wave.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(d / f"{i}.jpg", quality=90)


def measure(case, seconds):
  """Images/s of pretrain_batches for one case in this process."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from rrcm_jax.data import pipelines  # pylint: disable=g-import-not-at-top
  size, channels, source, batch = CASES[case]
  cfg = common.data_config(source, image_size=size, channels=channels)
  with tempfile.TemporaryDirectory() as tmp:
    if source == "folder":
      _write_jpeg_folder(tmp)
      cfg.folder, cfg.cache = tmp, False
    else:
      cfg.synthetic_examples = {"train": 10_000}
    it = pipelines.pretrain_batches(cfg, global_batch_size=batch, seed=0)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds / 3:  # warm-up: cache fill, autotune
      next(it)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      count += next(it)["x"].shape[0]
    return count / (time.perf_counter() - start)


def run_pinned(case, cores, seconds):
  """measure() in a child process restricted to the first `cores` CPUs."""
  code = (f"import os; os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:{cores}])); "
          f"from benchmarks import data_pipeline as b; print('RATE', b.measure({case!r}, {seconds}))")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=pathlib.Path(__file__).resolve().parents[1], check=True).stdout
  return float(next(l for l in out.splitlines() if l.startswith("RATE")).split()[1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement")
  parser.add_argument("--cores", default=None, help="comma-separated core counts (default 1 and all)")
  parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
  args = parser.parse_args(argv)
  available = len(os.sched_getaffinity(0))
  cores = [int(c) for c in args.cores.split(",")] if args.cores else sorted({1, available})
  rows = []
  for case in args.cases.split(","):
    rates = {c: run_pinned(case, c, args.seconds) for c in cores}
    per_core = rates[1] if 1 in rates else rates[max(rates)] / max(rates)
    need = needed_rate(case)
    rows.append(dict(case=case, images_per_s={str(c): round(r, 1) for c, r in rates.items()},
                     per_core=round(per_core, 1), host_needs=round(need),
                     cores_needed=round(need / per_core, 1)))
  header = f"{'case':9s} " + " ".join(f"{c:>2d} core(s)" for c in cores) + \
      "  per core  8-GPU host needs  cores needed"
  print(header)
  for r in rows:
    print(f"{r['case']:9s} " + " ".join(f"{r['images_per_s'][str(c)]:>10.0f}" for c in cores) +
          f"  {r['per_core']:>8.0f}  {r['host_needs']:>16d}  {r['cores_needed']:>12.1f}")
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps(dict(
      rows=rows, host_assumptions=HOST, forward_gflop_per_image=FORWARD_GFLOP,
      machine=dict(cpus=available, processor=os.uname().machine), seconds=args.seconds), indent=2))
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
