"""Classifiers at a noise level: conditioning, building and loading.

Spaces (docs/method.md, "Conventions"): pipelines give uint8 pixels; the
classifier sees model space (v − 0.5)/0.5 in [-1, 1]. A certification σ is a
*pixel-space* std; the same noise has model-space std s = 2σ
(`denoiser.model_noise_level`). Every `s` and `grid_sigma` below is model
space. A classifier at level s is called on x + s·ε with c_in and τ of the
grid point σ_j nearest s (s = 0 → σ_{N−1}); `logits_at_level` is that one
call, shared by fine-tuning, evaluation and certification.

Classifiers come from a pre-training workdir (its encoder under a fresh
head, `load_pretrained_encoder`), a fine-tuning workdir (`load_classifier`)
or the authors' PyTorch .pth (`torch_classifier`); `load_smoothing_classifier`
turns a certification config into the sampler's logits function.
"""
import functools
import os

import jax
from etils import epath

from rrcm_jax import checkpoints, denoiser, flops, models, parallel, pretrain_step, schedules

# Which copy of the pre-trained encoder becomes the classifier's trunk. The
# reference leaves it open; we default to the EMA model (config.init_weights).
WEIGHTS = {"ema": "ema_params", "online": "params", "target": "target_params"}
# config.init_weights: a stored copy, or "ema_debiased", the EMA model without the weight it
# still puts on the initialization (`pretrain_step.debiased_ema`).
INIT_WEIGHTS = tuple(WEIGHTS) + ("ema_debiased",)
# Model keys that fix the parameter shapes: these must match a checkpoint.
ARCHITECTURE_KEYS = ("image_size", "channels", "patch_size", "width", "depth", "num_heads",
                     "mlp_ratio", "time_mlp")
DEFAULT_NUM_SCALES = 81   # from scratch: the grid of the paper's checkpoints
TORCH_NUM_SCALES = 81     # the authors' released checkpoints (docs/method.md, "Noise-level grid")


# ----------------------------------------------------------------------------
# Noise conditioning.
# ----------------------------------------------------------------------------
def grid_sigma(s, num_scales, denoiser_cfg):
  """σ_j of the grid point nearest the model-space level s (a Python float)."""
  grid = dict(sigma_min=denoiser_cfg.sigma_min, sigma_max=denoiser_cfg.sigma_max,
              rho=denoiser_cfg.rho)
  j = denoiser.nearest_grid_index(s, num_scales, **grid)
  return float(denoiser.karras_sigma(j, num_scales, **grid))


def logits_at_level(apply_fn, params, x_noisy, grid_sigma_value,
                    sigma_data=denoiser.SIGMA_DATA):
  """Classifier logits [B, K] of model-space inputs x + s·ε [B, H, W, C], the
  encoder called with c_in and τ of the grid point `grid_sigma_value`."""
  return denoiser.encode_at_sigma(apply_fn, {"params": params}, x_noisy, grid_sigma_value,
                                  sigma_data=sigma_data)


def level_logits_fn(model, num_scales, denoiser_cfg):
  """predict_fn(params, x_noisy, s) -> logits [B, K]: model-space inputs [B, H, W, C]
  at the model-space level s (a Python float, 0 = clean), conditioned on its grid point."""
  def predict(params, x_noisy, s):
    with jax.ensure_compile_time_eval():   # σ_j is a constant of the trace, as outside jit
      sigma_j = grid_sigma(s, num_scales, denoiser_cfg)
    return logits_at_level(model.apply, params, x_noisy, sigma_j, denoiser_cfg.sigma_data)
  return predict


def make_smoothing_logits_fn(model, num_scales, sigma_pixel, denoiser_cfg):
  """logits_fn(params, x_model) for the certification sampler.

  `x_model` = (x + σε − 0.5)/0.5, already noisy (model-space std 2σ); the
  classifier is conditioned on the grid point nearest 2σ.
  """
  sigma_j = grid_sigma(denoiser.model_noise_level(sigma_pixel), num_scales, denoiser_cfg)
  return functools.partial(logits_at_level, model.apply, grid_sigma_value=sigma_j,
                           sigma_data=denoiser_cfg.sigma_data)


# ----------------------------------------------------------------------------
# Building, and weights from a pre-training or fine-tuning workdir.
# ----------------------------------------------------------------------------
def build_classifier(config):
  """The Classifier of a fine-tuning config (model, data.num_classes, final_norm)."""
  return models.classifier(config.model, config.data.num_classes, config.final_norm)


def check_architecture(saved_model_cfg, model_cfg, source):
  """One sentence naming the first shape-determining key that differs."""
  for k in ARCHITECTURE_KEYS:
    saved, ours = saved_model_cfg.get(k), model_cfg.get(k)
    if saved != ours:
      raise ValueError(f"{source} holds another architecture: checkpoint {k} {saved}, "
                       f"config {k} {ours}.")


def load_pretrained_encoder(config, abstract_params):
  """The pre-trained RCMEncoder's "vit" parameters for the classifier of `config`.

  config.init_from: a pre-training workdir, its checkpoints/ or checkpoints/<step>;
  config.init_weights: "ema" (the fixed-rate EMA model), "online", "target" or
    "ema_debiased" (the EMA model bias-corrected for its initialization, `debiased_encoder`).
  abstract_params: the classifier's abstract parameters (with shardings).

  Returns:
    (vit params, info) with info = dict(num_scales N(k) of the checkpoint's
    pre-training step k, pretrain_step, pretrain_flops).
  """
  source = f"config.init_from={config.init_from}"
  workdir, step = checkpoints.resolve_checkpoint(config.init_from)
  pre = checkpoints.read_config(workdir)
  if "scales" not in pre or "model" not in pre:
    raise ValueError(f"{source} is not a pre-training workdir (its config.json has no "
                     "scales/model sections).")
  check_architecture(pre.model, config.model, source)
  field = WEIGHTS[config.init_weights.replace("_debiased", "")]
  state, meta = checkpoints.restore_subtrees(
      workdir, "checkpoints", {field: {"vit": abstract_params["vit"]}}, step, source)
  step = int(meta["step"])
  if config.init_weights == "ema_debiased":
    state[field]["vit"] = debiased_encoder(pre, state[field]["vit"], step)
  num_scales = schedules.num_scales(step, int(pre.scales.total_steps), int(pre.scales.start),
                                    int(pre.scales.end))
  pre_flops = flops.training_flops("pretrain", pre.model, step * int(pre.batch_size))
  return state[field]["vit"], dict(num_scales=num_scales, pretrain_step=step,
                                   pretrain_flops=float(pre_flops))


def debiased_encoder(pretrain_config, ema_vit, step):
  """The bias-corrected EMA encoder (`pretrain_step.debiased_ema`) of a pre-training run at
  `step`: θ₀ recomputed from its config's seed and model, exactly as its state started."""
  mesh = jax.tree.leaves(ema_vit)[0].sharding.mesh
  init_vit = pretrain_step.initial_params(pretrain_config, mesh)["vit"]
  init_vit = jax.tree.map(lambda a, e: jax.device_put(a, e.sharding), init_vit, ema_vit)
  return pretrain_step.debiased_ema(ema_vit, init_vit, float(pretrain_config.ema_rate), step)


def load_classifier(finetune_workdir, which="last", mesh=None):
  """A fine-tuned classifier for certification: (model, params, info).

  which: "last" (checkpoints/) or "best_clean", "best_noisy_0.5", ... (the
  best validation checkpoint of a metric; noisy_<s> is model-space s = 2σ).
  info: num_scales (N the classifier was trained with), sigma (pixel space),
  final_norm, model (config), num_classes, denoiser (config), task, step,
  which, train_flops (fine-tuning plus what it started from). Only the
  parameters are read, replicated on `mesh` (default: every device).
  """
  mesh = mesh or parallel.make_mesh()
  path, _ = checkpoints.resolve_checkpoint(finetune_workdir, key="finetune workdir")
  config = checkpoints.read_config(path)
  saved = ["last"] + sorted(p.name for p in path.iterdir() if p.name.startswith("best_"))
  if which not in saved:
    raise ValueError(f"which={which!r} is not saved in {path}; choose one of {saved}.")
  model = build_classifier(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *models.sample_inputs(config.model))
  abstract = checkpoints.abstract_like(
      abstract["params"], jax.tree.map(lambda _: parallel.replicated(mesh), abstract["params"]))
  subdir = "checkpoints" if which == "last" else which
  state, meta = checkpoints.restore_subtrees(path, subdir, {"params": abstract}, None,
                                             f"{path}/{subdir}")
  info = dict(num_scales=int(meta["num_scales"]), sigma=float(config.sigma),
              final_norm=bool(config.final_norm), model=config.model,
              num_classes=int(config.data.num_classes), denoiser=config.denoiser,
              task=config.task, step=int(meta["step"]), which=which,
              train_flops=float(meta.get("train_flops", 0.0) +
                                meta["init"].get("pretrain_flops", 0.0)))
  return model, state["params"], info


def initial_params(config, abstract_params):
  """(parameter overrides or None, info) for a fresh fine-tuning run; raises before
  anything is written.

  init_from None: from scratch, N = config.num_scales or 81. A pre-training
  workdir: its "vit" (config.init_weights) and N of its step. A fine-tuning
  workdir (e.g. a linear probe): its whole classifier (trained head) and its N.
  """
  if config.init_from is None:
    return None, dict(num_scales=config.num_scales or DEFAULT_NUM_SCALES, pretrain_flops=0.0)
  if str(config.init_from).endswith(".pth"):
    return torch_encoder(config, abstract_params)
  workdir, _ = checkpoints.resolve_checkpoint(config.init_from)
  saved = checkpoints.read_config(workdir)
  if "task" in saved:   # a fine-tuning run
    check_architecture(saved.model, config.model, f"config.init_from={config.init_from}")
    mesh = jax.tree.leaves(abstract_params)[0].sharding.mesh
    _, overrides, info = load_classifier(workdir, "last", mesh)
    info = dict(num_scales=info["num_scales"], pretrain_flops=info["train_flops"])
  else:
    vit, info = load_pretrained_encoder(config, abstract_params)
    overrides = {"vit": vit}
  if config.num_scales not in (None, info["num_scales"]):
    raise ValueError(f"config.num_scales={config.num_scales} differs from N={info['num_scales']} "
                     f"of config.init_from={config.init_from}; leave it unset.")
  return overrides, info


# The authors' networks in a pre-training .pth: config.init_weights -> its key.
TORCH_NETWORKS = {"ema": "nnet_ema", "online": "nnet", "target": "target_model"}


def torch_encoder(config, abstract_params):
  """({"vit": params}, info) from the authors' pre-training checkpoint config.init_from
  (a .pth holding nnet / nnet_ema / target_model, or one bare encoder state dict): the
  network config.init_weights names, N = config.num_scales or 81 (their grid)."""
  from rrcm_jax import torch_import  # pylint: disable=g-import-not-at-top  (PyTorch only here)
  path = epath.Path(config.init_from)
  if not path.is_file():
    raise ValueError(f"config.init_from={config.init_from} is not a file.")
  try:
    state_dict = torch_import.load_torch_checkpoint(
        path, TORCH_NETWORKS[config.init_weights], trusted=config.get("torch_trusted", False))
  except ImportError as e:
    raise ValueError(str(e)) from None
  encoder = models.rcm_encoder(config.model)
  variables = torch_import.load_variables(state_dict, encoder, models.sample_inputs(config.model),
                                          kind="encoder")
  vit = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), variables["params"]["vit"],
                     abstract_params["vit"])
  return {"vit": vit}, dict(num_scales=config.num_scales or TORCH_NUM_SCALES, pretrain_flops=0.0)


# ----------------------------------------------------------------------------
# The classifier a certification config names.
# ----------------------------------------------------------------------------
def _with_dtype(model_cfg, dtype):
  model_cfg = model_cfg.copy_and_resolve_references()
  with model_cfg.unlocked():
    model_cfg.dtype = dtype or model_cfg.dtype
  return model_cfg


def _check_data(config, image_size, channels, num_classes, source):
  for key, saved in (("image_size", image_size), ("channels", channels),
                     ("num_classes", num_classes)):
    if config.data[key] != saved:
      raise ValueError(f"{source} holds a classifier for {key} {saved}, but config.data.{key} is "
                       f"{config.data[key]}; use the config of the data it was trained on.")


def _absolute(path):
  return path if "://" in path else os.path.abspath(path)


def finetuned_classifier(config, mesh):
  """(model, params, N, denoiser config, record) of the fine-tuning workdir
  config.init_from, checkpoint config.checkpoint, in compute dtype config.dtype."""
  source = f"config.init_from={config.init_from}"
  workdir, _ = checkpoints.resolve_checkpoint(config.init_from)
  saved = checkpoints.read_config(workdir)
  if "task" not in saved:
    raise ValueError(f"{source} is not a fine-tuning workdir (its config.json has no task); "
                     "certify the classifier that rrcm_jax.finetune wrote.")
  names = ["last"] + sorted(p.name for p in workdir.iterdir() if p.name.startswith("best_"))
  if config.checkpoint not in names:
    raise ValueError(f"config.checkpoint={config.checkpoint!r} is not in {config.init_from}; "
                     f"choose one of {names}.")
  check_architecture(saved.model, config.model, source)
  _check_data(config, saved.model.image_size, saved.model.channels, saved.data.num_classes, source)
  model, params, info = load_classifier(workdir, config.checkpoint, mesh)
  if config.num_scales not in (None, info["num_scales"]):
    raise ValueError(f"config.num_scales={config.num_scales} differs from N={info['num_scales']} "
                     f"that {source} was trained with; leave it unset.")
  model_cfg = _with_dtype(info["model"], config.dtype)
  if model_cfg.dtype != info["model"].dtype:
    model = models.classifier(model_cfg, info["num_classes"], info["final_norm"])
  record = dict(source=_absolute(str(workdir)), checkpoint=config.checkpoint, step=info["step"],
                dtype=model_cfg.dtype, num_scales=info["num_scales"], task=info["task"],
                trained_sigma=info["sigma"], final_norm=info["final_norm"],
                train_flops=info["train_flops"])
  return model, params, info["num_scales"], info["denoiser"], record


def torch_classifier(config):
  """(model, params, N, denoiser config, record) of the authors' fine-tuned PyTorch
  classifier config.torch_checkpoint (config.model, data.num_classes, final_norm)."""
  from rrcm_jax import torch_import  # pylint: disable=g-import-not-at-top  (PyTorch only here)
  path = config.torch_checkpoint
  if not epath.Path(path).is_file():   # local or gs://
    raise ValueError(f"config.torch_checkpoint={path} is not a file.")
  model_cfg = _with_dtype(config.model, config.dtype)
  model = models.classifier(model_cfg, config.data.num_classes, config.final_norm)
  try:
    state_dict = torch_import.load_torch_checkpoint(path, config.torch_network,
                                                    trusted=config.torch_trusted)
  except ImportError as e:
    raise ValueError(str(e)) from None
  variables = torch_import.load_variables(state_dict, model, models.sample_inputs(model_cfg),
                                          kind="classifier")
  num_scales = config.num_scales or TORCH_NUM_SCALES
  record = dict(source=_absolute(path), checkpoint=config.torch_network or "default",
                step=None, dtype=model_cfg.dtype, num_scales=num_scales, task="torch",
                trained_sigma=None, final_norm=config.final_norm)
  return model, variables["params"], num_scales, config.denoiser, record


def load_smoothing_classifier(config, mesh):
  """(logits_fn(params, x_model) for the sampler, params, record of what is certified)
  for a certification config: config.init_from (a fine-tuning workdir) or
  config.torch_checkpoint; σ = config.sigma (pixel space)."""
  if config.init_from is not None:
    model, params, num_scales, denoiser_cfg, record = finetuned_classifier(config, mesh)
  else:
    model, params, num_scales, denoiser_cfg, record = torch_classifier(config)
  logits_fn = make_smoothing_logits_fn(model, num_scales, config.sigma, denoiser_cfg)
  return logits_fn, params, record
