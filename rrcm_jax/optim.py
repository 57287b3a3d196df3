"""The optimizers of both trainers: AdamW with warm-up + cosine.

Pre-training (`pretrain_optimizer`): one learning rate per step; a frozen
patch embedding gets no update. Fine-tuning (`finetune_optimizer`): BEiT
layer-wise learning-rate decay, no weight decay on 1-D parameters,
pos_embed and cls_token, the learning rate scaled by batch/256 and
(optionally) constant within an epoch as the reference's scheduler.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from rrcm_jax import schedules


def _names(path):
  return [getattr(k, "key", str(k)) for k in path]


# ----------------------------------------------------------------------------
# Pre-training.
# ----------------------------------------------------------------------------
def trainable_labels(params):
  """"frozen" for the patch embedding when it is frozen, "train" elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(getattr(k, "key", None) == "patch_embed" for k in path)
      else "train", params)


WEIGHT_DECAY_ON = ("all", "vit")


def pretrain_optimizer(config):
  """AdamW with warm-up + cosine over config.total_steps; a frozen patch embedding
  gets no update at all.

  config.optim.weight_decay_on: "all" (default) decays every parameter, as the
  reference's single AdamW parameter group; "vit" spares biases, norms,
  pos_embed and cls_token (`decays_weight`, as fine-tuning).
  """
  o = config.optim
  decay_on = o.get("weight_decay_on", "all")
  if decay_on not in WEIGHT_DECAY_ON:
    raise ValueError(f"config.optim.weight_decay_on must be one of {WEIGHT_DECAY_ON}, got "
                     f"{decay_on!r}.")
  mask = None if decay_on == "all" else (
      lambda p: jax.tree_util.tree_map_with_path(decays_weight, p))
  lr = functools.partial(schedules.learning_rate, base_lr=o.lr, warmup_steps=o.warmup_steps,
                         total_steps=config.total_steps)
  adamw = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.get("eps", 1e-8),
                      weight_decay=o.weight_decay, mask=mask)
  if not config.model.frozen_patch_embed:
    return adamw
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, trainable_labels)


# ----------------------------------------------------------------------------
# Fine-tuning: AdamW with BEiT layer-wise lr decay.
# ----------------------------------------------------------------------------
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


def finetune_optimizer(config, steps_per_epoch, trains):
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
