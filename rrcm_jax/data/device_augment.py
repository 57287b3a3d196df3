"""The pre-training and fine-tuning augmentations as JAX ops, per example, TensorFlow-free.

The same views as `augment` (the tf.image implementation), with the same
parameters, order and probabilities, written as functions of one example and
its vector of uniforms u [NUM_UNIFORMS] (the slot layout `U` of `augment`):
every random choice is the same arithmetic on the same slot, so given the same
u both implementations produce the same pixels (the tests compare them). Only
where u comes from differs: here `jax.random.uniform` of a per-example key,
there `tf.random.stateless_uniform`.

Images are [H, W, C], C = 1 or 3; uint8 [0, 255] at the boundaries of a view,
float32 [0, 1] pixel space inside. `jax.vmap` the per-example functions over a
batch. The input images must already have the model's size (CIFAR-10 32x32,
Fashion-MNIST / MNIST 28x28): the center view is then the image itself and no
crop is ever box-halved first (`augment.resized_crops` halves crops that are at
least twice the target side, which needs dynamic shapes).
"""
import math

import jax
import jax.numpy as jnp

# Slots of the per-view uniform vector u, as in augment.U (kept equal by a test).
U = dict(area=slice(0, 10), ratio=slice(10, 20), top=20, left=21, flip=22, jitter=23,
         factors=slice(24, 28), order=slice(28, 32), gray=32, blur=33, sigma=34, solarize=35)
NUM_UNIFORMS = 36
PRETRAIN_CROP_SCALE = (0.08, 1.0)
FINETUNE_CROP_SCALE = (0.4, 1.0)     # "strong" fine-tuning view
DEVICE_FINETUNE_AUGMENTS = ("none", "weak", "strong")
_LUMA = (0.299, 0.587, 0.114)


def to_float(image):
  """uint8 [0, 255] -> float32 [0, 1]."""
  return image.astype(jnp.float32) / 255.0


def to_uint8(image):
  """float [0, 1] -> uint8 [0, 255], rounded (half to even, as tf.round) and clipped."""
  return jnp.round(jnp.clip(image, 0.0, 1.0) * 255.0).astype(jnp.uint8)


# ------------------------------------------------------------------ geometry


def crop_box(u, height, width, scale=PRETRAIN_CROP_SCALE, ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params from u [NUM_UNIFORMS] (`augment.crop_box`).

  Ten (area fraction ~ U[scale], log aspect ~ U[log ratio]) candidates, the first
  that fits; else the whole image center-cropped to the nearest allowed aspect.
  Returns float32 scalars (top, left, crop_h, crop_w) with integer values.
  """
  h, w = jnp.float32(height), jnp.float32(width)
  area = h * w * (scale[0] + (scale[1] - scale[0]) * u[U["area"]])
  log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[U["ratio"]]
  crop_w = jnp.round(jnp.sqrt(area * jnp.exp(log_r)))
  crop_h = jnp.round(jnp.sqrt(area / jnp.exp(log_r)))
  fits = (crop_w <= w) & (crop_h <= h) & (crop_w > 0) & (crop_h > 0)
  first = jnp.argmax(fits)
  found = jnp.any(fits)
  crop_h = jnp.where(found, crop_h[first], jnp.minimum(h, jnp.round(w / ratio[0])))
  crop_w = jnp.where(found, crop_w[first], jnp.minimum(w, jnp.round(h * ratio[1])))
  top = jnp.where(found, jnp.floor(u[U["top"]] * (h - crop_h + 1)), jnp.floor((h - crop_h) / 2))
  left = jnp.where(found, jnp.floor(u[U["left"]] * (w - crop_w + 1)), jnp.floor((w - crop_w) / 2))
  return top, left, crop_h, crop_w


def _sample_coords(start, length, src, size):
  """Source rows (or columns) and weights of `size` bilinear samples over [start, start + length).

  Sample i sits at start + (i + 0.5) length / size - 0.5 (half-pixel centres, PIL /
  torchvision), computed as tf.image.crop_and_resize does in `augment.resized_crops`
  (a box in an image padded by one clamped pixel), so both round alike.
  Returns (low index, high index) int32 [size] into the unpadded side of length
  `src` (clamped at the edges) and the weight of the high one, float32 [size].
  """
  padded_1 = jnp.float32(src + 1)                  # (padded side - 1)
  a = start + 0.5 * length / size + 0.5
  b = a + (size - 1) * length / size
  a, b = a / padded_1, b / padded_1                # normalised box, as passed to crop_and_resize
  step = (b - a) * padded_1 / jnp.float32(size - 1) if size > 1 else jnp.float32(0.0)
  pos = a * padded_1 + jnp.arange(size, dtype=jnp.float32) * step
  low, high = jnp.floor(pos), jnp.ceil(pos)
  clamp = lambda p: jnp.clip(p.astype(jnp.int32) - 1, 0, src - 1)
  return clamp(low), clamp(high), pos - low


def resized_crop(image, box, size):
  """uint8 [H, W, C], box (top, left, crop_h, crop_w) -> uint8 [size, size, C].

  Bilinear, half-pixel centres, clamped at the image edges (`augment.resized_crops`
  without its box-halving, which never applies when H, W < 2 size). Materialized
  (optimization barrier): fused into later per-pixel ops, XLA:CPU would redo the
  gathers for every pixel those ops read.
  """
  return jax.lax.optimization_barrier(to_uint8(resized_crop_float(image, box, size)))


def resized_crop_float(image, box, size):
  """`resized_crop` before rounding: float32 [size, size, C] in [0, 1]."""
  top, left, crop_h, crop_w = box
  height, width = image.shape[:2]
  y_lo, y_hi, y_w = _sample_coords(top, crop_h, height, size)
  x_lo, x_hi, x_w = _sample_coords(left, crop_w, width, size)
  img = to_float(image)
  rows_lo, rows_hi = img[y_lo], img[y_hi]
  tl, tr = rows_lo[:, x_lo], rows_lo[:, x_hi]
  bl, br = rows_hi[:, x_lo], rows_hi[:, x_hi]
  xw, yw = x_w[None, :, None], y_w[:, None, None]
  upper = tl + (tr - tl) * xw                      # crop_and_resize's order of operations
  lower = bl + (br - bl) * xw
  return upper + (lower - upper) * yw


def flip(image, u):
  """Horizontal flip with p 0.5 (u[flip] < 0.5); any dtype [H, W, C]."""
  return jnp.where(u[U["flip"]] < 0.5, image[:, ::-1], image)


# ------------------------------------------------------------------ photometry (float [H, W, C])


def luma(image):
  """float [H, W, C] -> [H, W, 1]: 0.299 R + 0.587 G + 0.114 B (C = 1: the image)."""
  if image.shape[-1] == 1:
    return image
  # Written out: a reduction over a 3-wide axis is ~10x slower on XLA:CPU.
  return (_LUMA[0] * image[..., 0:1] + _LUMA[1] * image[..., 1:2]) + _LUMA[2] * image[..., 2:3]


def grayscale(image):
  """Luma in every channel."""
  return jnp.broadcast_to(luma(image), image.shape)


def _rgb_to_hue_range(rgb):
  """float [..., 3] -> hue in [0, 6), v_min, v_max: TensorFlow's AdjustHue kernel's quantities.

  Hue from the largest channel, found by comparing the channels (ties may fall either
  side, as in the kernel; the hue is continuous there). A few selects instead of the
  kernel's six-case table: XLA:CPU fuses a table's selects into many copies.
  """
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  r_max = (r >= g) & (r >= b)
  g_max = ~r_max & (g >= b)
  v_max = jnp.where(r_max, r, jnp.where(g_max, g, b))
  v_min = jnp.minimum(r, jnp.minimum(g, b))
  span = v_max - v_min
  safe = jnp.where(span > 0, span, 1.0)
  hue = jnp.where(r_max, (g - b) / safe, jnp.where(g_max, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  hue = jnp.where(hue < 0, hue + 6.0, hue)
  return jnp.where(span > 0, hue, 0.0), v_min, v_max


def _hue_range_to_rgb(hue, v_min, v_max):
  """Channel n in (5, 3, 1): v_max - (v_max - v_min) clip(min(k, 4 - k), 0, 1), k = (n + hue) mod 6.

  The kernel's piecewise-linear map (each channel the max, the min or the interpolated
  middle value of its sextant), equal to rounding.
  """
  span = v_max - v_min

  def channel(n):
    k = n + hue
    k = jnp.where(k >= 6.0, k - 6.0, k)
    return v_max - span * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def adjust_hue(image, delta):
  """float RGB [H, W, 3], delta (fraction of the hue circle): tf.image.adjust_hue's kernel."""
  hue, v_min, v_max = _rgb_to_hue_range(image)
  hue = hue + delta * 6
  hue = jnp.where(hue < 0, hue + 6, hue)             # |delta| <= 1: one turn at most
  hue = jnp.where(hue >= 6, hue - 6, hue)
  return _hue_range_to_rgb(hue, v_min, v_max)


def _mean(image):
  """Mean of all values; a dot product, since XLA:CPU's vmapped reductions are ~10x slower."""
  flat = image.reshape(-1)
  return jnp.dot(flat, jnp.ones_like(flat)) / flat.size


def _blend(image, factor, mean):
  return jnp.clip(factor * image + (1 - factor) * mean, 0.0, 1.0)


def _blends(image, order, factors, slots, active=lambda s: True):
  """The brightness / contrast / saturation ops at `slots` of `order` where active(slot).

  The three are one blend f x + (1 - f) m towards m = 0, the mean luma or the luma
  (f x + (1 - f) 0 is exactly f x): one evaluation per slot, not three.
  """
  out = image
  for slot in slots:
    op = order[slot]
    y = luma(out)
    target = jnp.where(op == 1, _mean(y), jnp.where(op == 2, y, 0.0))
    out = jnp.where(active(slot) & (op < 3), _blend(out, factors[jnp.minimum(op, 2)], target), out)
  return out


def color_jitter(image, u, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8):
  """torchvision ColorJitter with probability p (`augment.color_jitter`), one example.

  Factors ~ U[1 - v, 1 + v] (hue shift ~ U[-v, v] of the circle) from u[factors],
  applied in the order argsort(u[order]); C = 1: brightness and contrast only.
  """
  f = u[U["factors"]]
  factors = jnp.stack([1 - brightness + 2 * brightness * f[0], 1 - contrast + 2 * contrast * f[1],
                       1 - saturation + 2 * saturation * f[2], -hue + 2 * hue * f[3]])
  num_ops = 4 if image.shape[-1] == 3 else 2
  order = jnp.argsort(u[U["order"]][:num_ops], stable=True)
  if num_ops == 2:
    out = _blends(image, order, factors, range(2))
  else:  # the blends before the hue slot, the hue shift once, the blends after it
    hue_slot = jnp.argmax(order == 3)
    out = _blends(image, order, factors, range(3), lambda s: s < hue_slot)
    out = _blends(adjust_hue(out, factors[3]), order, factors, range(1, 4), lambda s: s > hue_slot)
  return jnp.where(u[U["jitter"]] < p, out, image)


def random_grayscale(image, u, p=0.2):
  return jnp.where(u[U["gray"]] < p, grayscale(image), image)


def blur_kernel_size(size):
  """About 10% of the image side, odd, at least 3 (`augment.blur_kernel_size`)."""
  k = int(0.1 * size)
  return max(3, k + 1 - k % 2)


def gaussian_blur(image, u, p, sigma=(0.1, 2.0)):
  """Separable Gaussian blur with probability p, sigma ~ U[sigma], reflect padding."""
  if p <= 0.0:
    return image
  height, width = image.shape[:2]
  radius = blur_kernel_size(height) // 2
  s = sigma[0] + (sigma[1] - sigma[0]) * u[U["sigma"]]
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-taps ** 2 / (2 * s ** 2))
  weights = weights / jnp.sum(weights)
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
  rows = sum(weights[k] * padded[k:k + height] for k in range(2 * radius + 1))
  blurred = sum(weights[k] * rows[:, k:k + width] for k in range(2 * radius + 1))
  if p >= 1.0:
    return blurred
  return jnp.where(u[U["blur"]] < p, blurred, image)


def solarize(image, u, p, threshold=0.5):
  """Invert pixels >= threshold with probability p."""
  if p <= 0.0:
    return image
  return jnp.where(u[U["solarize"]] < p, jnp.where(image >= threshold, 1.0 - image, image), image)


# ------------------------------------------------------------------ views


def strong_view(crop, u, blur_p, solarize_p):
  """uint8 crop [S, S, C] -> uint8: flip, jitter p 0.8, grayscale p 0.2, blur, solarize."""
  v = flip(to_float(crop), u)
  # Materialized: the blur reads every pixel 2 x 3 times, and fused it would recompute the jitter.
  v = jax.lax.optimization_barrier(random_grayscale(color_jitter(v, u), u))
  return to_uint8(solarize(gaussian_blur(v, u, blur_p), u, solarize_p))


def pretrain_views_from_uniforms(image, u, crop_scale=PRETRAIN_CROP_SCALE):
  """uint8 [S, S, C], u [3, NUM_UNIFORMS] -> {"x", "a1", "a2"}: uint8 [S, S, C].

  x = flip (u[0]); a1 = crop, blur p 1.0 (u[1]); a2 = crop, blur p 0.1, solarize p 0.2 (u[2]).
  """
  size = image.shape[0]
  views = {"x": flip(image, u[0])}
  for name, k, blur_p, solarize_p in (("a1", 1, 1.0, 0.0), ("a2", 2, 0.1, 0.2)):
    crop = resized_crop(image, crop_box(u[k], size, image.shape[1], tuple(crop_scale)), size)
    views[name] = strong_view(crop, u[k], blur_p, solarize_p)
  return views


def pretrain_views(image, key, crop_scale=PRETRAIN_CROP_SCALE):
  """uint8 [S, S, C], a key -> {"x", "a1", "a2"}: the views of one example."""
  return pretrain_views_from_uniforms(image, jax.random.uniform(key, (3, NUM_UNIFORMS)), crop_scale)


def finetune_view_from_uniforms(image, u, augment):
  """uint8 [S, S, C], u [NUM_UNIFORMS] -> uint8 [S, S, C] (`augment.finetune_view`).

  "none": the image; "weak": flip; "strong": random resized crop 0.4-1 + flip.
  """
  if augment == "none":
    return image
  if augment == "weak":
    return flip(image, u)
  if augment == "strong":
    size = image.shape[0]
    return flip(resized_crop(image, crop_box(u, size, image.shape[1], FINETUNE_CROP_SCALE), size), u)
  raise ValueError(f"augment={augment!r} is not available on the device pipeline; allowed: "
                   f"{DEVICE_FINETUNE_AUGMENTS} (\"autoaug\" needs data.pipeline='tfdata').")


def finetune_view(image, key, augment):
  """uint8 [S, S, C], a key -> uint8 [S, S, C]: one fine-tuning view."""
  return finetune_view_from_uniforms(image, jax.random.uniform(key, (NUM_UNIFORMS,)), augment)
