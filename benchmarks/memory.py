r"""Compiled memory of the RCM-B pre-training step at 224×224: which per-device batch fits.

  python -m benchmarks.memory [--batches 32,64,128,256,512] [--depths 1,2] [--full-depth]
                              [--devices 8] [--quick]

`jax.jit(step).lower(abstract state, abstract batch, key).compile().memory_analysis()`
of `pretrain_step.make_train_step` for configs/imagenet_pretrain_rcmb.py (ViT-B/16
at 224, bfloat16 matmuls, float32 parameters and AdamW state, projection
4096), with and without activation rematerialization (`model.remat`, one
`jax.checkpoint` per block) and with and without FSDP (`mesh.fsdp`: the
state sharded over the "data" axis), over a range of per-device batches.
Nothing runs: the inputs are abstract (shapes, dtypes, shardings). Peak per
device = arguments + outputs − donated (aliased) + temporaries.

Compiling the whole 12-block step for every case takes long on a small CPU,
so by default each case is compiled at depths 1 and 2 and extrapolated
linearly to 12 (every block adds the same parameters, optimizer state and
saved activations); `--full-depth` also compiles depth 12 to check the
extrapolation. On CPU the figures are an estimate of a GPU's (another
backend fuses and schedules differently, and XLA:CPU keeps some bfloat16
work in float32): the JSON marks them so. On a GPU host run it there
(benchmarks/gpu_check.sh). With one device, FSDP over 8 devices is the
compiled figure minus 7/8 of the shardable state (an estimate, marked).
Writes benchmarks/results/memory.json.
"""
import argparse
import os
import sys

if "jax" not in sys.modules:   # FSDP needs 8 devices; on CPU XLA can simulate them
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from benchmarks import report
from configs import imagenet_pretrain_rcmb
from rrcm_jax import checkpoints, models, optim, parallel, pretrain_step, train_state
# pylint: enable=g-import-not-at-top,wrong-import-position

GB = 1e9
DEVICE_MEMORY_GB = 80.0   # H100 / A100 80 GB
USABLE_FRACTION = 0.95    # with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX's default is 0.75)


def rcmb_config(depth, batch_per_device, remat, fsdp, devices, image_size=224, width=None):
  """configs/imagenet_pretrain_rcmb.py at `depth` (`width`: a narrower model for tests)."""
  config = imagenet_pretrain_rcmb.get_config()
  if width:
    config.model.width, config.model.num_heads = width, 2
    config.model.proj_hidden, config.model.proj_out = 2 * width, width
  config.model.depth = depth
  config.model.remat = remat
  config.model.image_size = config.data.image_size = image_size
  config.mesh.fsdp = fsdp
  config.batch_size = batch_per_device * devices
  return config


def abstract_state(config, model, tx, mesh):
  """(abstract state with shardings, shardings) without allocating anything."""
  def init():
    variables = model.init(jax.random.key(0), *models.sample_inputs(config.model), train=True)
    return train_state.TrainState.create(variables["params"], tx, variables["batch_stats"],
                                         with_target=True, with_ema=True)
  abstract = jax.eval_shape(init)
  shardings = parallel.state_shardings(abstract, mesh, fsdp=config.mesh.fsdp,
                                       min_size=config.mesh.fsdp_min_size)
  return checkpoints.abstract_like(abstract, shardings), shardings


def per_device_bytes(abstract):
  """Bytes of a pytree of sharded ShapeDtypeStructs held by one device."""
  total = 0
  for leaf in jax.tree.leaves(abstract):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def compiled_memory(config, mesh):
  """Per-device bytes of the compiled step: arguments, outputs, aliased, temp, peak, state."""
  model = models.rcm_encoder(config.model)
  tx = optim.pretrain_optimizer(config)
  state, shardings = abstract_state(config, model, tx, mesh)
  step = pretrain_step.make_train_step(config, model, tx, mesh, shardings)
  m = config.model
  view = jax.ShapeDtypeStruct((config.batch_size, m.image_size, m.image_size, m.channels),
                              np.uint8, sharding=parallel.data_sharding(mesh))
  batch = {k: view for k in ("x", "a1", "a2")}
  # Nothing runs, so GEMM autotuning (minutes over many cases on a GPU) is left out.
  options = {"xla_gpu_autotune_level": 0} if jax.default_backend() == "gpu" else None
  lowered = step.lower(state, batch, jax.random.key(0))
  stats = lowered.compile(compiler_options=options).memory_analysis()
  out = dict(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
             aliased=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes)
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
  out["state"] = per_device_bytes(state)
  return out


def extrapolate(by_depth, depth):
  """Linear fit (exact through two depths) of every figure to `depth`."""
  (d1, a), (d2, b) = sorted(by_depth.items())[:2]
  return {k: a[k] + (b[k] - a[k]) * (depth - d1) / (d2 - d1) for k in a}


def case_rows(batch, remat, mesh, depths, full_depth, image_size, fsdp_options, width=None,
              target=12):
  """The rows of one (per-device batch, remat) case, for each FSDP option, at depth `target`
  (compiled there, or extrapolated from `depths`)."""
  devices, rows = mesh.devices.size, []
  for fsdp in fsdp_options:
    if fsdp and devices == 1 and rows:   # one device: the replicated compile, state / 8 on paper
      row = dict(rows[0], fsdp=True, estimate=True,
                 method=rows[0]["method"] + "; FSDP-8 = minus 7/8 of the state (estimate)")
      row["peak_gb"] -= row["state_gb"] * 7 / 8
      row.pop("peak_gb_compiled_depth12", None)
    else:
      by_depth = {d: compiled_memory(
          rcmb_config(d, batch, remat, fsdp, devices, image_size, width), mesh)
                  for d in depths}
      figures = by_depth[target] if target in by_depth else extrapolate(by_depth, target)
      method = f"compiled at depth {target}" if target in by_depth else (
          f"extrapolated from depths {','.join(map(str, sorted(by_depth)))} to {target}")
      row = dict(batch_per_device=batch, remat=remat, fsdp=fsdp, devices=devices, method=method,
                 depth=target, backend=jax.default_backend(),
                 estimate=jax.default_backend() == "cpu" or target not in by_depth,
                 **{f"{k}_gb": v / GB for k, v in figures.items()})
      if full_depth and target not in by_depth:
        row["peak_gb_compiled_depth12"] = compiled_memory(
            rcmb_config(target, batch, remat, fsdp, devices, image_size, width), mesh)["peak"] / GB
    row["fits_80gb"] = row["peak_gb"] <= DEVICE_MEMORY_GB * USABLE_FRACTION
    rows.append(row)
  return rows


COLUMNS = [("batch_per_device", "batch/device", "{}"), ("remat", "remat", "{}"),
           ("fsdp", "fsdp", "{}"), ("state_gb", "state GB", "{:.2f}"),
           ("temp_gb", "temp GB", "{:.1f}"), ("peak_gb", "peak GB", "{:.1f}"),
           ("peak_gb_compiled_depth12", "peak GB (depth 12 compiled)", "{:.1f}"),
           ("fits_80gb", "fits 80 GB", "{}"), ("estimate", "estimate", "{}")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", default="32,64,128,256,512", help="per-device batches")
  parser.add_argument("--depths", default="1,2", help="compiled depths (12: no extrapolation)")
  parser.add_argument("--target-depth", type=int, default=12, help="RCM-B: 12 blocks")
  parser.add_argument("--remat", default="both", choices=["both", "off", "on"])
  parser.add_argument("--full-depth", action="store_true", help="also compile depth 12 (slow)")
  parser.add_argument("--devices", type=int, default=None, help="mesh size (default: all, ≤ 8)")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--no-fsdp", action="store_true", help="only the replicated state")
  parser.add_argument("--width", type=int, default=None, help="a narrower model (tests)")
  parser.add_argument("--quick", action="store_true", help="a narrow model at 32x32 (tests)")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results)")
  args = parser.parse_args(argv)
  if args.quick:
    args.batches, args.depths, args.target_depth = "2", "1", 1
    args.image_size, args.width, args.remat = 32, 64, "off"
  devices = jax.devices()[:args.devices or 8]
  mesh = parallel.make_mesh(devices)
  depths = [int(d) for d in args.depths.split(",")]
  rows = []
  fsdp_options = (False,) if args.no_fsdp else (False, True)
  for batch in [int(b) for b in args.batches.split(",")]:
    for remat in {"both": (False, True), "off": (False,), "on": (True,)}[args.remat]:
      for row in case_rows(batch, remat, mesh, depths, args.full_depth, args.image_size,
                           fsdp_options, args.width, args.target_depth):
        rows.append(row)
        print(report.format_table([row], COLUMNS).splitlines()[-1], file=sys.stderr, flush=True)
  print(report.format_table(rows, COLUMNS))
  fitting = [r for r in rows if r["fits_80gb"]]
  for remat in (False, True):
    for fsdp in (False, True):
      ok = [r["batch_per_device"] for r in fitting if r["remat"] == remat and r["fsdp"] == fsdp]
      print(f"remat={remat} fsdp={fsdp}: largest per-device batch that fits 80 GB: "
            f"{max(ok) if ok else 'none measured'}")
  path = report.write_results("memory", dict(rows=rows, image_size=args.image_size,
                                                 width=args.width or 768,
                                                 device_memory_gb=DEVICE_MEMORY_GB,
                                                 usable_fraction=USABLE_FRACTION), args.out)
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
