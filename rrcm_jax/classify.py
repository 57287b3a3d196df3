"""The classifier side of rRCM: noise conditioning, the classifier's state and
initial weights (a pre-training workdir, a fine-tuning workdir or scratch),
the layer-decayed optimizer, evaluation, FLOP accounting, and
`load_classifier` for certification.

Spaces (SPEC "Conventions"): pipelines give uint8 pixels; the classifier sees
model space (v − 0.5)/0.5 in [-1, 1]. A certification σ is a *pixel-space*
std; the same noise has model-space std s = 2σ (`denoiser.model_noise_level`).
Every `s` and `grid_sigma` below is model space. A classifier at level s is
called on x + s·ε with c_in and τ of the grid point σ_j nearest s (s = 0 →
σ_{N−1}); `logits_at_level` is that one call, shared by fine-tuning,
evaluation and certification (`make_smoothing_logits_fn`).
"""
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from rrcm_jax import checkpoints, denoiser, models, parallel, pretrain, schedules, train_state

# Which copy of the pre-trained encoder becomes the classifier's trunk. The
# reference leaves it open; we default to the EMA model (config.init_weights).
WEIGHTS = {"ema": "ema_params", "online": "params", "target": "target_params"}
# Model keys that fix the parameter shapes: these must match a checkpoint.
ARCHITECTURE_KEYS = ("image_size", "channels", "patch_size", "width", "depth", "num_heads",
                     "mlp_ratio", "time_mlp")
# Forward-equivalents per image per step: a forward without gradient counts 1,
# forward + backward 3. Pre-training: 3 online calls with gradient (3 each),
# the no-gradient h(x + σ'ε) and 2 target calls (1 each); consistency: m = 2
# draws with gradient; a linear probe only runs the frozen encoder forward.
FORWARD_EQUIVALENTS = {"pretrain": 12, "consistency": 6, "finetune": 3, "linear": 1}
DEFAULT_NUM_SCALES = 81   # from scratch: the grid of the paper's checkpoints


# ----------------------------------------------------------------------------
# FLOP accounting.
# ----------------------------------------------------------------------------
def forward_flops(model_cfg, num_classes=0, projection=False):
  """Matmul FLOPs (2 per multiply-add) of one forward of one image.

  Counts the patch embedding, qkv, attention scores and values, projections,
  MLPs, the optional time MLP, and a linear head of `num_classes` outputs or
  (`projection`) the 3-layer projection head. Elementwise ops are left out.
  RCM-B at 224 with p = 16: 35.3 GFLOP (≈ 17.7 G multiply-adds, SPEC).
  """
  d, p, r = model_cfg.width, model_cfg.patch_size, model_cfg.mlp_ratio
  patches = (model_cfg.image_size // p) ** 2
  tokens = patches + 2
  macs = patches * p * p * model_cfg.channels * d
  block = tokens * d * (3 * d + d + 2 * r * d) + 2 * tokens * tokens * d
  macs += model_cfg.depth * block
  if model_cfg.time_mlp:
    macs += 8 * d * d
  macs += d * num_classes
  if projection:
    h = model_cfg.proj_hidden
    macs += d * h + h * h + h * model_cfg.proj_out
  return 2 * macs


def training_flops(stage, model_cfg, images, num_classes=0):
  """FLOPs of training `images` images (summed over steps) in `stage`
  ("pretrain", "consistency", "finetune", "linear"), see FORWARD_EQUIVALENTS."""
  if stage not in FORWARD_EQUIVALENTS:
    raise ValueError(f"stage must be one of {sorted(FORWARD_EQUIVALENTS)}, got {stage!r}.")
  if stage == "pretrain":
    per_forward = forward_flops(model_cfg, projection=True)
  else:
    per_forward = forward_flops(model_cfg, num_classes)
  return FORWARD_EQUIVALENTS[stage] * per_forward * images


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


def make_smoothing_logits_fn(model, num_scales, sigma_pixel, denoiser_cfg):
  """logits_fn(params, x_model) for the certification sampler.

  `x_model` = (x + σε − 0.5)/0.5, already noisy (model-space std 2σ); the
  classifier is conditioned on the grid point nearest 2σ.
  """
  sigma_j = grid_sigma(denoiser.model_noise_level(sigma_pixel), num_scales, denoiser_cfg)
  return functools.partial(logits_at_level, model.apply, grid_sigma_value=sigma_j,
                           sigma_data=denoiser_cfg.sigma_data)


def per_example_noise(key, index, shape):
  """ε [B, *shape] with example `index[b]` drawn from fold_in(key, index[b]):
  independent of the batch size, the padding and the number of devices."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(index)


def metric_name(s):
  """"clean" for s = 0, else "noisy_<s>" with s the model-space level (noisy_0.5 is σ = 0.25)."""
  return "clean" if s == 0 else f"noisy_{float(s)}"


# ----------------------------------------------------------------------------
# Optimizer: AdamW with BEiT layer-wise lr decay.
# ----------------------------------------------------------------------------
def _names(path):
  return [getattr(k, "key", str(k)) for k in path]


def layer_id(path, depth):
  """BEiT layer of a classifier parameter: 0 for cls_token, pos_embed and the
  patch embedding, k + 1 for blocks_k, depth + 1 for everything else."""
  names = _names(path)
  if "vit" in names[:-1]:
    name = names[names.index("vit") + 1]
    if name in ("cls_token", "pos_embed", "patch_embed"):
      return 0
    if name.startswith("blocks_"):
      return int(name.split("_")[1]) + 1
  return depth + 1


def layer_scale(path, depth, decay):
  """Learning-rate factor decay^(depth + 1 − layer)."""
  return decay ** (depth + 1 - layer_id(path, depth))


def decays_weight(path, leaf):
  """No weight decay on 1-D parameters (biases, norms), pos_embed and cls_token."""
  return leaf.ndim > 1 and not {"pos_embed", "cls_token"} & set(_names(path))


def lr_schedule(config, steps_per_epoch):
  """step -> lr: base lr × batch/256, warm-up then cosine over epochs.

  `config.optim.per_epoch_lr`: constant within an epoch, as the reference
  (its scheduler steps once per epoch, so epoch 0 runs at lr 0); otherwise
  the same curve evaluated at every step.
  """
  o = config.optim
  peak = o.lr * config.batch_size / 256

  def lr(step):
    if o.per_epoch_lr:
      return schedules.learning_rate(jnp.floor_divide(step, steps_per_epoch), peak,
                                     o.warmup_epochs, config.epochs)
    return schedules.learning_rate(step, peak, o.warmup_epochs * steps_per_epoch,
                                   config.epochs * steps_per_epoch)
  return lr


def make_optimizer(config, steps_per_epoch, trains):
  """AdamW with layer-wise lr decay; parameters with trains(path) False (and a
  frozen patch embedding) get no update at all, weight decay included.

  Returns (tx, lr_fn).
  """
  o, depth = config.optim, config.model.depth
  frozen_embed = config.model.frozen_patch_embed
  updated = lambda path: trains(path) and not (frozen_embed and "patch_embed" in _names(path))
  lr = lr_schedule(config, steps_per_epoch)
  adamw = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                      mask=lambda p: jax.tree_util.tree_map_with_path(decays_weight, p))
  scale = optax.stateless(lambda updates, params: jax.tree_util.tree_map_with_path(
      lambda path, u: u * layer_scale(path, depth, o.layer_decay), updates))
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if updated(path) else "frozen", params)
  tx = optax.multi_transform({"train": optax.chain(adamw, scale), "frozen": optax.set_to_zero()},
                             labels)
  return tx, lr


def build_classifier(config):
  return models.classifier(config.model, config.data.num_classes, config.final_norm)


def _init_fn(config, model, tx):
  def init(overrides):
    variables = model.init(jax.random.key(config.seed), *pretrain.sample_inputs(config.model))
    return train_state.TrainState.create(dict(variables["params"], **(overrides or {})), tx)
  return init


def state_layout(config, model, tx, mesh):
  """(abstract state with shardings, shardings): what a fresh state or a restore fills."""
  abstract = jax.eval_shape(_init_fn(config, model, tx), None)
  shardings = parallel.state_shardings(abstract, mesh, fsdp=config.mesh.fsdp)
  return checkpoints.abstract_like(abstract, shardings), shardings


def create_state(config, model, tx, mesh, overrides=None):
  """A fresh fine-tuning state (params, opt_state, step) in its shardings.

  `overrides` replace top-level parameter subtrees of the fresh initialization
  ({"vit": pre-trained encoder} or a whole classifier).
  """
  abstract, shardings = state_layout(config, model, tx, mesh)
  if overrides is not None:
    shapes = lambda t: jax.tree.map(lambda a: tuple(a.shape), t)
    if shapes({k: abstract.params[k] for k in overrides}) != shapes(overrides):
      raise ValueError("the loaded parameter shapes differ from the classifier's "
                       "(config.model does not match config.init_from).")
  return jax.jit(_init_fn(config, model, tx), out_shardings=shardings)(overrides), shardings


# ----------------------------------------------------------------------------
# Encoder weights from a pre-training workdir.
# ----------------------------------------------------------------------------
def read_config(workdir):
  """The config.json a run wrote into its workdir, as a ConfigDict (or ValueError)."""
  path = epath.Path(workdir) / "config.json"
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable run config ({e}).") from None


def resolve_checkpoint(init_from, key="config.init_from"):
  """(run workdir, step or None) for a workdir, its checkpoints/ or checkpoints/<step>."""
  path = epath.Path(init_from)
  if not path.exists():
    raise ValueError(f"{key}={init_from} does not exist.")
  candidates = [(path, None)]
  if path.name == "checkpoints":
    candidates.append((path.parent, None))
  if path.name.isdigit() and path.parent.name == "checkpoints":
    candidates.append((path.parent.parent, int(path.name)))
  for workdir, step in candidates:
    if (workdir / "config.json").exists() and (workdir / "checkpoints").is_dir():
      return workdir, step
  raise ValueError(f"{key}={init_from} is not a checkpoint: expected a run workdir with "
                   "config.json and checkpoints/ (or its checkpoints/ or checkpoints/<step>).")


def check_architecture(saved_model_cfg, model_cfg, source):
  """One sentence naming the first shape-determining key that differs."""
  for k in ARCHITECTURE_KEYS:
    saved, ours = saved_model_cfg.get(k), model_cfg.get(k)
    if saved != ours:
      raise ValueError(f"{source} holds another architecture: checkpoint {k} {saved}, "
                       f"config {k} {ours}.")


def complete_step(ckpt, step, source):
  """The requested (or newest) complete checkpoint step, or ValueError."""
  steps = ckpt.all_steps()
  if step is None and steps:
    step = max(steps)
  if step is None or step not in steps:
    raise ValueError(f"{source} has no complete checkpoint"
                     f"{'' if step is None else f' at step {step}'}.")
  return step


def restore_subtrees(workdir, subdir, target, step, source):
  """Reads only `target` (abstract subtrees of a saved TrainState, e.g.
  {"ema_params": {"vit": ...}}, with shardings) and the meta of checkpoint
  `step` (None: the newest); no optimizer state or other copy is read."""
  ckpt = checkpoints.Checkpointer(workdir, subdir=subdir)
  try:
    step = complete_step(ckpt, step, source)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True),
        meta=ocp.args.JsonRestore()))
  finally:
    ckpt.close()
  return restored["state"], restored["meta"]


def load_pretrained_encoder(config, abstract_params):
  """The pre-trained RCMEncoder's "vit" parameters for the classifier of `config`.

  config.init_from: a pre-training workdir, its checkpoints/ or checkpoints/<step>;
  config.init_weights: "ema" (the fixed-rate EMA model), "online" or "target".
  abstract_params: the classifier's abstract parameters (with shardings).

  Returns:
    (vit params, info) with info = dict(num_scales N(k) of the checkpoint's
    pre-training step k, pretrain_step, pretrain_flops).
  """
  source = f"config.init_from={config.init_from}"
  workdir, step = resolve_checkpoint(config.init_from)
  pre = read_config(workdir)
  if "scales" not in pre or "model" not in pre:
    raise ValueError(f"{source} is not a pre-training workdir (its config.json has no "
                     "scales/model sections).")
  check_architecture(pre.model, config.model, source)
  field = WEIGHTS[config.init_weights]
  state, meta = restore_subtrees(workdir, "checkpoints", {field: {"vit": abstract_params["vit"]}},
                                 step, source)
  step = int(meta["step"])
  num_scales = schedules.num_scales(step, int(pre.scales.total_steps), int(pre.scales.start),
                                    int(pre.scales.end))
  flops = training_flops("pretrain", pre.model, step * int(pre.batch_size))
  return state[field]["vit"], dict(num_scales=num_scales, pretrain_step=step,
                                   pretrain_flops=float(flops))


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
  path, _ = resolve_checkpoint(finetune_workdir, key="finetune workdir")
  config = read_config(path)
  saved = ["last"] + sorted(p.name for p in path.iterdir() if p.name.startswith("best_"))
  if which not in saved:
    raise ValueError(f"which={which!r} is not saved in {path}; choose one of {saved}.")
  model = build_classifier(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *pretrain.sample_inputs(config.model))
  abstract = checkpoints.abstract_like(
      abstract["params"], jax.tree.map(lambda _: parallel.replicated(mesh), abstract["params"]))
  subdir = "checkpoints" if which == "last" else which
  state, meta = restore_subtrees(path, subdir, {"params": abstract}, None, f"{path}/{subdir}")
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
  workdir, _ = resolve_checkpoint(config.init_from)
  saved = read_config(workdir)
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


# ----------------------------------------------------------------------------
# Evaluation: clean and noisy accuracy, every example exactly once.
# ----------------------------------------------------------------------------
def make_eval_step(model, num_scales, levels, denoiser_cfg, mesh, param_shardings, seed=0):
  """Jitted (params, batch) -> {"count", metric_name(s): correct} summed over the batch.

  batch: image uint8 [B, H, W, C], label int32 [B], mask bool [B] (False on
  padding), index int32 [B] (the example's index in the split: its noise).
  levels: model-space noise levels s (0 = clean).
  """
  key = jax.random.key(seed)
  conditioned = [(metric_name(s), s, grid_sigma(s, num_scales, denoiser_cfg)) for s in levels]

  def step(params, batch):
    x = denoiser.pixels_to_model(batch["image"])
    valid = batch["mask"].astype(jnp.float32)
    out = {"count": jnp.sum(valid)}
    for i, (name, s, sigma_j) in enumerate(conditioned):
      noisy = x
      if s > 0:
        noisy = x + s * per_example_noise(jax.random.fold_in(key, i), batch["index"], x.shape[1:])
      logits = logits_at_level(model.apply, params, noisy, sigma_j, denoiser_cfg.sigma_data)
      out[name] = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * valid)
    return out

  return jax.jit(step, in_shardings=(param_shardings, parallel.data_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


def evaluate(eval_step, params, batches, mesh):
  """Accuracies {metric_name: fraction correct} over a finite iterator of
  per-process eval batches (see `make_eval_step`)."""
  totals = None
  for local in batches:
    local = dict(image=np.asarray(local["image"]), mask=np.asarray(local["mask"]),
                 label=np.asarray(local["label"], np.int32),
                 index=np.maximum(np.asarray(local["index"]), 0).astype(np.int32))  # padding: -1
    out = eval_step(params, parallel.global_batch(local, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    raise ValueError("the evaluation split is empty.")
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  return {k: float(v) / max(count, 1.0) for k, v in totals.items()}
