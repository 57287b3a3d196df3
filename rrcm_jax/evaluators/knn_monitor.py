r"""The k-NN representation monitor of pre-training, and its post-hoc command.

During pre-training (`config.knn_every` > 0, `rrcm_jax.pretrain`): every
knn_every steps the weighted k-NN accuracy (`knn.KnnEvaluator`) of the online
and the EMA encoder, clean and at the model-space noise levels
`config.knn.levels` (s = 2σ for a pixel-space σ), logged to metrics.jsonl as
knn/online/clean, knn/ema/noisy_0.5, ...; at step 0 also the raw-pixel
baseline (knn/pixels/...) and knn/seconds, the cost of one evaluation.

Data: the bank is the clean features of `config.knn.bank_split` (default
train[:10000], images the encoder trains on, as in DINO's monitor); the queries
are `config.knn.query_split` (default test[:2000]). The test split is used
only to watch: nothing is chosen on it (no checkpoint selection, no early
stopping), so certification on test images stays a fresh evaluation. The
encoder is conditioned on the grid of the evaluated step, N(step).

Post hoc, for a pre-training workdir's newest (or given) checkpoint:

  python -m rrcm_jax.evaluators.knn_monitor WORKDIR [--step K] [--json out.json]

prints the k-NN accuracies of the random initialization, the online, EMA,
bias-corrected EMA (`pretrain_step.debiased_ema`) and target encoders, and raw
pixels, with the workdir's own config.knn settings.
"""
import argparse
import json
import sys
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from rrcm_jax import checkpoints, parallel, pretrain_step, schedules
from rrcm_jax.evaluators import knn


def host_split(config, split):
  """(images uint8 [N, S, S, C], labels int32 [N]) of `split`, the same on every process.

  The device pipeline's arrays (no TensorFlow) when config.data.pipeline is "device",
  else the tf.data certification reader (every example of the split, in canonical order).
  """
  if config.data.get("pipeline", None) == "device":
    from rrcm_jax.data import arrays  # pylint: disable=g-import-not-at-top
    data = arrays.load_split(config.data, split)
    return data.images, data.labels
  from rrcm_jax.data import pipelines  # pylint: disable=g-import-not-at-top  (TensorFlow)
  examples = pipelines.certification_subset(config.data, split=split, every=1)
  return (np.stack([e[1] for e in examples]).astype(np.uint8),
          np.asarray([e[2] for e in examples], np.int32))


def _name(prefix, metric):
  """("knn/online", "knn_noisy_0.5") -> "knn/online/noisy_0.5"."""
  return f"{prefix}/{metric[len('knn_'):]}"


class KnnMonitor:
  """k-NN accuracies of pre-training encoders on the config's bank and query splits.

  Args:
    config: the pre-training config (data, model, denoiser, scales, knn).
  """

  def __init__(self, config):
    c = config.knn
    if c.batch_size < 1 or c.k < 1 or not c.levels:
      raise ValueError(f"config.knn needs batch_size >= 1, k >= 1 and at least one level; got "
                       f"batch_size={c.batch_size}, k={c.k}, levels={c.levels}.")
    self.config = config
    self.bank = host_split(config, c.bank_split)
    self.queries = host_split(config, c.query_split)
    self.features_fn = knn.encoder_features_fn(config.model, c.feature)   # one compilation
    self._pixels = None

  def _evaluator(self, features_fn, num_scales):
    c = self.config.knn
    return knn.KnnEvaluator(features_fn, *self.bank, *self.queries, levels=tuple(c.levels),
                            num_scales=int(num_scales), denoiser_cfg=self.config.denoiser,
                            k=int(c.k), temperature=float(c.temperature),
                            batch_size=int(c.batch_size), num_classes=self.config.data.num_classes,
                            seed=self.config.seed)

  def num_scales(self, step):
    s = self.config.scales
    return schedules.num_scales(int(step), int(s.total_steps), int(s.start), int(s.end))

  def encoders(self, params_by_name, step):
    """{f"knn/{name}/{level}": accuracy} of each encoder ({name: params with "vit"}) at the
    grid N(step), plus knn/seconds (the time of the whole call)."""
    start = time.time()
    evaluator = self._evaluator(self.features_fn, self.num_scales(step))
    row = {}
    for name, params in params_by_name.items():
      row.update({_name(f"knn/{name}", m): v for m, v in evaluator.run(params)})
    row["knn/seconds"] = time.time() - start
    return row

  def pixels(self):
    """{"knn/pixels/<level>": accuracy} of the raw-pixel baseline (computed once)."""
    if self._pixels is None:
      evaluator = self._evaluator(knn.pixel_features, 81)
      self._pixels = {_name("knn/pixels", m): v for m, v in evaluator.run(None)}
    return dict(self._pixels)

  def during_training(self, state, step):
    """The pre-training row: online and EMA encoders at `step` (at step 0 they are the
    initialization, evaluated once, and the pixel baseline is added)."""
    if step == 0:
      row = self.encoders({"online": state.params}, step)
      row.update({k.replace("knn/online/", "knn/ema/"): v for k, v in row.items()
                  if k.startswith("knn/online/")})
      row.update(self.pixels())
      return row
    return self.encoders({"online": state.params, "ema": state.ema_params}, step)


# ----------------------------------------------------------------------------
# Post hoc: every copy of a pre-training checkpoint.
# ----------------------------------------------------------------------------
def checkpoint_encoders(workdir, step=None):
  """(config, step, {name: {"vit": params}}) of a pre-training workdir's checkpoint:
  init (θ₀ recomputed from the seed), online, ema, ema_debiased, target."""
  path, step = checkpoints.resolve_checkpoint(workdir)
  config = checkpoints.read_config(path)
  if "knn" not in config:
    config = _with_knn_defaults(config, path)
  init = pretrain_step.initial_params(config, parallel.make_mesh())
  fields = {"online": "params", "ema": "ema_params", "target": "target_params"}
  abstract = checkpoints.abstract_like(init)
  state, meta = checkpoints.restore_subtrees(
      path, "checkpoints", {f: {"vit": abstract["vit"]} for f in fields.values()}, step,
      f"{workdir}")
  step = int(meta["step"])
  out = {"init": {"vit": init["vit"]}}
  out.update({name: state[field] for name, field in fields.items()})
  out["ema_debiased"] = {"vit": pretrain_step.debiased_ema(
      state["ema_params"]["vit"], init["vit"], float(config.ema_rate), step)}
  return config, step, out


# config.knn of configs/common.py, for workdirs written before the monitor existed.
DEFAULTS = dict(bank_split="train[:10000]", query_split="test[:2000]", levels=(0.0, 0.5, 1.0),
                k=20, temperature=0.07, batch_size=500, feature="feature")


def _with_knn_defaults(config, path):
  if "scales" not in config:
    raise ValueError(f"{path} is not a pre-training workdir (its config.json has no scales).")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.knn = ml_collections.ConfigDict(DEFAULTS)
  return config


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m rrcm_jax.evaluators.knn_monitor",
      description="k-NN accuracies of a pre-training checkpoint's encoders and of raw pixels.")
  parser.add_argument("workdir", help="a pre-training workdir (or its checkpoints/<step>)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  parser.add_argument("--json", default=None, help="also write the numbers to this file")
  args = parser.parse_args(argv)
  target = args.workdir if args.step is None else f"{args.workdir}/checkpoints/{args.step}"
  config, step, encoders = checkpoint_encoders(target)
  from rrcm_jax.data import device  # pylint: disable=g-import-not-at-top
  config = device.resolve_pipeline(config)
  monitor = KnnMonitor(config)
  row = monitor.encoders(encoders, step)
  row.update(monitor.pixels())
  levels = sorted({k.rsplit("/", 1)[1] for k in row if k.count("/") == 2},
                  key=lambda n: (n != "clean", n))
  print(f"k-NN accuracy, step {step}, N {monitor.num_scales(step)}, bank {config.knn.bank_split}, "
        f"queries {config.knn.query_split}, k {config.knn.k}:\n")
  print("| encoder | " + " | ".join(levels) + " |\n|---|" + "---|" * len(levels))
  for name in list(encoders) + ["pixels"]:
    print(f"| {name} | " + " | ".join(f"{100 * row[f'knn/{name}/{n}']:.1f}" for n in levels) + " |")
  if args.json:
    epath.Path(args.json).write_text(json.dumps(dict(row, step=step), indent=2))


if __name__ == "__main__":
  sys.exit(main())
