"""Mixup / CutMix with label smoothing, in JAX (on device, inside jit; no TensorFlow).

timm's `Mixup` in "batch" mode, as the reference's ImageNet fine-tuning uses it
(mixup alpha 0.8, cutmix alpha 1.0, switch probability 0.5, label smoothing
0.1 with RandAugment at sigma = 0.25): one lambda per batch; each image is
mixed with the image at the mirrored position of the batch (x[::-1]).
CutMix pastes a box of area fraction ~(1 - lambda) and then sets lambda to the
exact pasted fraction ("correct_lam").
"""
import jax
import jax.numpy as jnp


def smooth_labels(labels, num_classes, smoothing=0.0):
  """int [B] -> float32 [B, num_classes]: 1 - smoothing + smoothing/K on the label, smoothing/K elsewhere."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def cutmix_mask(key, height, width, lam):
  """bool [H, W]: the box CutMix pastes, of area fraction about (1 - lam), clipped to the image.

  timm `rand_bbox`: side ratio sqrt(1 - lam), centre uniform over the image.
  """
  cut = jnp.sqrt(1.0 - lam)
  cut_h = (height * cut).astype(jnp.int32)
  cut_w = (width * cut).astype(jnp.int32)
  key_y, key_x = jax.random.split(key)
  cy = jax.random.randint(key_y, (), 0, height)
  cx = jax.random.randint(key_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = (jnp.arange(height) >= y0) & (jnp.arange(height) < y1)
  cols = (jnp.arange(width) >= x0) & (jnp.arange(width) < x1)
  return rows[:, None] & cols[None, :]


def mixup_cutmix(key, images, labels, num_classes, *, mixup_alpha=0.8, cutmix_alpha=1.0,
                 switch_prob=0.5, label_smoothing=0.1):
  """Mixes a batch with its mirror image by mixup or CutMix.

  Args:
    key: a jax.random key.
    images: float [B, H, W, C] (pixel or model space: mixing is linear).
    labels: int [B] class indices.
    num_classes: K.
    mixup_alpha, cutmix_alpha: Beta(alpha, alpha) parameters; 0 turns one off
      (both 0: label smoothing only).
    switch_prob: probability of CutMix when both are on.
    label_smoothing: smoothing of the one-hot targets before mixing.

  Returns:
    (images float [B, H, W, C], soft targets float32 [B, K], rows sum to 1).
  """
  targets = smooth_labels(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0.0 and cutmix_alpha <= 0.0:
    return images, targets
  key_switch, key_mix, key_cut, key_box = jax.random.split(key, 4)
  if mixup_alpha > 0.0 and cutmix_alpha > 0.0:
    use_cutmix = jax.random.bernoulli(key_switch, switch_prob)
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0.0)
  lam_mix = jax.random.beta(key_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
  lam_cut = jax.random.beta(key_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
  height, width = images.shape[1], images.shape[2]
  box = cutmix_mask(key_box, height, width, lam_cut)
  lam_cut = 1.0 - box.mean()  # the exact kept fraction
  flipped = images[::-1]
  mixed = jnp.where(use_cutmix,
                    jnp.where(box[None, :, :, None], flipped, images),
                    lam_mix * images + (1.0 - lam_mix) * flipped)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
  return mixed.astype(images.dtype), lam * targets + (1.0 - lam) * targets[::-1]
