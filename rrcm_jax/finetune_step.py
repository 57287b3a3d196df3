"""One fine-tuning step, its tasks, its state and the config checks it needs.

`config.sigma` is the certification noise in pixel space; training adds
model-space noise s = 2σ and conditions the encoder on the grid point
nearest s (docs/method.md, "Fine-tuning"). Tasks ("consistency",
"finetune", "linear") are loss factories in `TASKS`.
"""
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from rrcm_jax import checkpoints, classifier, denoiser, losses, models, parallel, train_state
from rrcm_jax.data import mixup


# ----------------------------------------------------------------------------
# Tasks: small factories of losses, by name.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Task:
  """loss(noisy_logits, params, x, targets, key) -> (loss, metrics), with x model-space
  images [B, H, W, C], targets [B, K] and noisy_logits(params, x, key) the logits
  of x + s·ε at the training level; trains(path) says whether the optimizer
  updates a parameter; forward_equivalents counts FLOPs per image per step;
  clean: train at level s = 0 (no noise, the grid point nearest 0) whatever σ."""
  loss: Callable
  trains: Callable
  forward_equivalents: int
  clean: bool = False


def _is_head(path):
  return getattr(path[0], "key", None) == "head"


def _accuracy(logits, targets):
  return jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))


def consistency_lambda(config):
  """λ: config.consistency.lam, or the method's 10 for σ <= 0.25 and 20 above when None."""
  lam = config.consistency.lam
  return lam if lam is not None else (10.0 if config.sigma <= 0.25 else 20.0)


def consistency_task(config):
  """Jeong & Shin (2020): m noise draws, CE + λ·KL to the mean + η·H(mean).
  The head trains only with config.train_head (default False, as the reference)."""
  m, lam, eta = config.consistency.draws, consistency_lambda(config), config.consistency.eta

  def loss(noisy_logits, params, x, targets, key):
    copies = jnp.concatenate([x] * m)          # row i·B + n: draw i of image n
    logits = noisy_logits(params, copies, key).reshape(m, x.shape[0], -1)
    total, parts = losses.consistency_loss(logits, targets, lam, eta)
    return total, dict(parts, acc=_accuracy(logits[0], targets))

  trains = (lambda path: True) if config.train_head else (lambda path: not _is_head(path))
  return Task(loss, trains, 3 * m)


def gaussian_task(config):
  """Gaussian noise augmentation (Cohen et al. 2019): CE + entropy_weight · mean entropy."""
  def loss(noisy_logits, params, x, targets, key):
    logits = noisy_logits(params, x, key)
    ce = jnp.mean(losses.soft_cross_entropy(logits, targets))
    entropy = losses.mean_entropy(logits)
    return ce + config.entropy_weight * entropy, dict(ce=ce, entropy=entropy,
                                                      acc=_accuracy(logits, targets))
  return Task(loss, lambda path: True, 3)


def linear_task(config):
  """A linear probe: the gaussian_task loss, only the head trains (encoder forward only)."""
  return Task(gaussian_task(config).loss, _is_head, 1)


def clean_task(config):
  """A standard classifier: cross-entropy on clean images (no noise; conditioned at the
  grid point nearest 0), every parameter trained. The base classifier of diffusion
  denoised smoothing, which classifies denoised images (config.sigma is not used)."""
  return dataclasses.replace(gaussian_task(config), clean=True)


TASKS = {"consistency": consistency_task, "finetune": gaussian_task, "linear": linear_task,
         "clean": clean_task}


# ----------------------------------------------------------------------------
# Config checks: before anything compiles or is written.
# ----------------------------------------------------------------------------
def validate_config(config, mesh):
  """Raises ValueError with one sentence naming the bad key and what is allowed."""
  models.validate_model_config(config.model)
  if config.task not in TASKS:
    raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {config.task!r}.")
  if not config.sigma > 0:
    raise ValueError(f"config.sigma={config.sigma} must be > 0 (the pixel-space noise std; "
                     "training adds 2*sigma in model space).")
  if config.init_weights not in classifier.INIT_WEIGHTS:
    raise ValueError(f"config.init_weights must be one of {sorted(classifier.INIT_WEIGHTS)}, got "
                     f"{config.init_weights!r}.")
  if config.init_weights == "ema_debiased" and str(config.init_from).endswith(".pth"):
    raise ValueError("config.init_weights='ema_debiased' needs a pre-training workdir in "
                     "config.init_from (its seed gives θ₀), not a .pth; use 'ema'.")
  for k in ("image_size", "channels"):
    if config.data[k] != config.model[k]:
      raise ValueError(f"config.data.{k}={config.data[k]} must equal config.model.{k}="
                       f"{config.model[k]}.")
  if not 0 <= config.optim.warmup_epochs <= config.epochs or config.epochs < 1:
    raise ValueError(f"config.optim.warmup_epochs={config.optim.warmup_epochs} must be in "
                     f"[0, config.epochs={config.epochs}] and epochs at least 1.")
  if not 0 < config.optim.layer_decay <= 1:
    raise ValueError(f"config.optim.layer_decay={config.optim.layer_decay} must be in (0, 1].")
  if any(s < 0 for s in config.eval_levels):
    raise ValueError(f"config.eval_levels={tuple(config.eval_levels)} must be model-space "
                     "noise levels >= 0.")
  if config.task == "consistency" and config.consistency.draws < 2:
    raise ValueError(f"config.consistency.draws={config.consistency.draws} must be at least 2.")
  if config.num_scales is not None and config.num_scales < 2:
    raise ValueError(f"config.num_scales={config.num_scales} must be at least 2 (or None).")
  if not 0 <= config.label_smoothing < 1:
    raise ValueError(f"config.label_smoothing={config.label_smoothing} must be in [0, 1).")
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, key="eval_batch_size")


# ----------------------------------------------------------------------------
# State.
# ----------------------------------------------------------------------------
def _init_fn(config, model, tx):
  def init(overrides):
    variables = model.init(jax.random.key(config.seed), *models.sample_inputs(config.model))
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
# One step.
# ----------------------------------------------------------------------------
def make_train_step(config, model, tx, lr_fn, task, num_scales, mesh, shardings):
  """The jitted step: (state, batch {image uint8 [B, H, W, C], label int [B]}, key)
  -> (state, metrics).

  Noise s = 2·config.sigma (model space) at the grid point nearest s; soft
  targets from mixup/cutmix and label smoothing; frozen parameters get zero
  gradients (and no update).
  """
  s = 0.0 if task.clean else denoiser.model_noise_level(config.sigma)
  sigma_j = classifier.grid_sigma(s, num_scales, config.denoiser)
  batch_sharding = parallel.data_sharding(mesh)

  def noisy_logits(params, x, key):
    eps = jax.lax.with_sharding_constraint(jax.random.normal(key, x.shape, jnp.float32),
                                           batch_sharding)
    return classifier.logits_at_level(model.apply, params, x + s * eps, sigma_j,
                                      config.denoiser.sigma_data)

  def step_fn(state, batch, key):
    key_mix, key_noise = jax.random.split(jax.random.fold_in(key, state.step))
    x, targets = mixup.mixup_cutmix(
        key_mix, denoiser.pixels_to_model(batch["image"]), batch["label"],
        config.data.num_classes, mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
        switch_prob=config.mixup_switch_prob, label_smoothing=config.label_smoothing)
    loss_fn = functools.partial(task.loss, noisy_logits)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, x, targets, key_noise)
    grads = jax.tree_util.tree_map_with_path(
        lambda path, g: g if task.trains(path) else jnp.zeros_like(g), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params), lr=lr_fn(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding, parallel.replicated(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
