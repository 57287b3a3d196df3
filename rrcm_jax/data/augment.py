"""Image augmentations as pure TensorFlow functions of explicit stateless seeds.

Randomness: each example draws ONE vector of uniforms `u = uniforms(seed)`
(`tf.random.stateless_uniform`, seed an int [2] tensor) and every random
choice of a view is arithmetic on a fixed slot of `u` (layout `U`). So a seed
gives the same pixels eagerly and inside `tf.data`, with any parallelism, and
the per-image work splits into two pure stages:
  geometry    per example (images of any size): decode-side crops and resizes
              -> uint8 [S, S, C] (PIL-like: uint8 between ops);
  photometry  per batch [B, S, S, C] with per-example u [B, NUM_UNIFORMS]:
              flip, colour jitter, grayscale, blur, solarize, all vectorised.
Images are [H, W, C], C = 1 (Fashion-MNIST, MNIST) or 3, pixel space: uint8
[0, 255] at the stage boundaries, float32 [0, 1] inside.

Views (docs/method.md, Pre-training objective, "Strong augmentations";
BYOL-style, torchvision semantics):
  x   resize the short side + center crop (the image itself when it already
      has the target size, e.g. CIFAR-10 32x32, Fashion-MNIST 28x28), flip;
  a1  random resized crop (scale 0.08-1, ratio 3/4-4/3, bilinear as
      torchvision's default), flip, colour jitter p 0.8 (brightness 0.4,
      contrast 0.4, saturation 0.2, hue 0.1, random order), grayscale p 0.2,
      Gaussian blur p 1.0 (sigma ~ U[0.1, 2], kernel ~10% of the side);
  a2  the same with blur p 0.1 and solarize p 0.2.
Single-channel images: jitter is brightness and contrast only, no grayscale.
Fine-tuning views: "none", "weak", "strong", "autoaug" (`finetune_view`;
RandAugment lives in `rrcm_jax.data.randaugment`).
"""
import math

from rrcm_jax.data import import_tensorflow
from rrcm_jax.data import randaugment

tf = import_tensorflow()

FINETUNE_AUGMENTS = ("none", "weak", "strong", "autoaug")
# Slots of the per-view uniform vector u.
U = dict(area=slice(0, 10), ratio=slice(10, 20), top=20, left=21, flip=22, jitter=23,
         factors=slice(24, 28), order=slice(28, 32), gray=32, blur=33, sigma=34, solarize=35)
NUM_UNIFORMS = 36


def uniforms(seed, views=1):
  """float32 [views, NUM_UNIFORMS] in [0, 1): all the randomness of `views` views."""
  return tf.random.stateless_uniform([views, NUM_UNIFORMS], seed)


def to_float(image):
  """uint8 [0, 255] -> float32 [0, 1]."""
  return tf.cast(image, tf.float32) / 255.0


def to_uint8(image):
  """float [0, 1] -> uint8 [0, 255], rounded and clipped."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)


def apply_where(flags, fn, images, *params):
  """fn(images[i], params[i]...) for the examples with flags[i], the rest unchanged.

  flags bool [B], images [B, ...], params [B] each. Only the selected examples
  are computed (gather, fn, scatter), so rare ops (blur p 0.1) cost little.
  """
  idx = tf.where(flags)
  changed = fn(tf.gather_nd(images, idx), *(tf.gather_nd(p, idx) for p in params))
  return tf.tensor_scatter_nd_update(images, idx, changed)


# ------------------------------------------------------------------ geometry (per example)


def _halvings(short, target):
  """How often a side of length `short` is halved while it is >= 2 * target."""
  ratio = tf.cast(short, tf.float32) / tf.cast(target, tf.float32)
  return tf.maximum(tf.cast(tf.floor(tf.math.log(ratio) / math.log(2.0) + 1e-6), tf.int32), 0)


def _box_shrink(image, halvings):
  """Area (box-filter) downscale by 2**halvings; float [H, W, C]."""
  shape = tf.shape(image)
  factor = 2 ** halvings
  return tf.cond(halvings > 0,
                 lambda: tf.image.resize(image, [shape[0] // factor, shape[1] // factor], method="area"),
                 lambda: image)


def center_view(image, size):
  """uint8 [H, W, C] -> uint8 [size, size, C]: short side resized to `size`, center crop.

  Large images are halved with a box filter while >= 2x the target, then one
  bicubic resize (ADM's center_crop_arr). The image itself when already size x size.
  """
  if image.shape[0] == size and image.shape[1] == size:
    return image
  image = to_float(image)
  shape = tf.shape(image)
  image = _box_shrink(image, _halvings(tf.minimum(shape[0], shape[1]), size))
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = size / tf.minimum(h, w)
  new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
  new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
  image = tf.image.resize(image, [new_h, new_w], method="bicubic")
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return to_uint8(tf.ensure_shape(image[top:top + size, left:left + size], [size, size, image.shape[-1]]))


def crop_box(u, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params from uniforms u [..., NUM_UNIFORMS].

  Ten (area fraction ~ U[scale], log aspect ~ U[log ratio]) boxes, the first
  that fits; else the whole image center-cropped to the nearest allowed aspect.
  Returns float32 (top, left, crop_h, crop_w) with integer values, shape [...].
  """
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., U["area"]])
  log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., U["ratio"]]
  crop_w = tf.round(tf.sqrt(area * tf.exp(log_r)))
  crop_h = tf.round(tf.sqrt(area / tf.exp(log_r)))
  fits = (crop_w <= w) & (crop_h <= h) & (crop_w > 0) & (crop_h > 0)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=-1, output_type=tf.int32)[..., None]
  found = tf.reduce_any(fits, axis=-1)
  pick = lambda v: tf.gather(v, first, batch_dims=first.shape.rank - 1)[..., 0]
  fallback_w = tf.minimum(w, tf.round(h * ratio[1]))
  fallback_h = tf.minimum(h, tf.round(w / ratio[0]))
  crop_h = tf.where(found, pick(crop_h), fallback_h)
  crop_w = tf.where(found, pick(crop_w), fallback_w)
  top = tf.where(found, tf.floor(u[..., U["top"]] * (h - crop_h + 1)), tf.floor((h - crop_h) / 2))
  left = tf.where(found, tf.floor(u[..., U["left"]] * (w - crop_w + 1)), tf.floor((w - crop_w) / 2))
  return top, left, crop_h, crop_w


def resized_crops(image, u, size, scale=(0.08, 1.0)):
  """uint8 [H, W, C], u [n, NUM_UNIFORMS] -> uint8 [n, size, size, C]: n random resized crops.

  Bilinear with half-pixel centres (PIL / torchvision) and clamping at the image
  edges, one crop_and_resize call for all n; samples within half a source pixel
  of a crop's border read the pixels just outside it (torchvision clamps to the
  crop). When every crop is >= 2x the target the image is first box-halved.
  """
  shape = tf.shape(image)
  top, left, crop_h, crop_w = crop_box(u, shape[0], shape[1], scale)
  small = _box_shrink(to_float(image), _halvings(tf.reduce_min(tf.minimum(crop_h, crop_w)), size))
  shape_f = tf.cast(tf.shape(small), tf.float32)
  sy = shape_f[0] / tf.cast(shape[0], tf.float32)
  sx = shape_f[1] / tf.cast(shape[1], tf.float32)
  top, crop_h, left, crop_w = top * sy, crop_h * sy, left * sx, crop_w * sx
  padded = tf.pad(small, [[1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")  # clamp at the edges
  # crop_and_resize samples y1 * (H' - 1) + i * (y2 - y1) * (H' - 1) / (size - 1) in the padded
  # image (H' = H + 2); choose y1, y2 so that sample i sits at top + (i + 0.5) crop_h / size - 0.5.
  y0 = top + 0.5 * crop_h / size + 0.5
  x0 = left + 0.5 * crop_w / size + 0.5
  y1 = y0 + (size - 1) * crop_h / size
  x1 = x0 + (size - 1) * crop_w / size
  boxes = tf.stack([y0 / (shape_f[0] + 1), x0 / (shape_f[1] + 1),
                    y1 / (shape_f[0] + 1), x1 / (shape_f[1] + 1)], axis=-1)
  crops = tf.image.crop_and_resize(padded[None], boxes, tf.zeros(tf.shape(boxes)[:1], tf.int32),
                                   [size, size], method="bilinear")
  return to_uint8(crops)


# ------------------------------------------------------------------ photometry (per batch)


def flip(images, u):
  """images [B, H, W, C], u [B, NUM_UNIFORMS]: horizontal flip with p 0.5."""
  return apply_where(u[:, U["flip"]] < 0.5, lambda x: tf.reverse(x, axis=[2]), images)


def luma(images):
  """float [..., C] -> [..., 1]: 0.299 R + 0.587 G + 0.114 B (C = 1: the image)."""
  if images.shape[-1] == 1:
    return images
  return tf.linalg.matvec(images, tf.constant([0.299, 0.587, 0.114]))[..., None]


def grayscale(images):
  """float [..., C] -> luma in every channel, same C."""
  return tf.broadcast_to(luma(images), tf.shape(images))


def shift_hue(images, delta):
  """float RGB [n, H, W, 3], delta [n] (fraction of the hue circle): HSV hue rotation.

  The fused tf.image.adjust_hue kernel per example (it takes one delta).
  """
  return tf.map_fn(lambda a: tf.image.adjust_hue(a[0], a[1]), (images, delta),
                   fn_output_signature=tf.TensorSpec(images.shape[1:], tf.float32))


def _jitter_ops(images):
  """The torchvision ColorJitter ops, op(x, factor [b]) on float x [b, H, W, C]."""
  per = lambda f: f[:, None, None, None]
  clip = lambda x: tf.clip_by_value(x, 0.0, 1.0)
  ops = [lambda x, f: clip(x * per(f)),                                   # brightness
         lambda x, f: clip(per(f) * x + (1 - per(f)) *                    # contrast
                           tf.reduce_mean(luma(x), axis=[1, 2, 3], keepdims=True))]
  if images.shape[-1] == 3:
    ops += [lambda x, f: clip(per(f) * x + (1 - per(f)) * luma(x)),       # saturation
            shift_hue]
  return ops


def color_jitter(images, u, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8):
  """float [B, H, W, C] -> same: torchvision ColorJitter with probability p.

  Factors ~ U[1 - v, 1 + v] (hue shift ~ U[-v, v] of the circle), drawn once
  per example; the ops run in a per-example random order (argsort of
  uniforms). At each of the slots, every op works only on the examples that
  apply it there, so each example pays for each op once.
  """
  f = u[:, U["factors"]]
  factors = [1 - brightness + 2 * brightness * f[:, 0], 1 - contrast + 2 * contrast * f[:, 1],
             1 - saturation + 2 * saturation * f[:, 2], -hue + 2 * hue * f[:, 3]]
  ops = _jitter_ops(images)
  order = tf.argsort(u[:, U["order"]][:, :len(ops)], axis=-1, stable=True)
  applies = u[:, U["jitter"]] < p
  out = images
  for slot in range(len(ops)):
    idx = [tf.where(applies & tf.equal(order[:, slot], j)) for j in range(len(ops))]
    changed = [op(tf.gather_nd(out, i), tf.gather_nd(factors[j], i)) for j, (op, i) in enumerate(zip(ops, idx))]
    out = tf.tensor_scatter_nd_update(out, tf.concat(idx, 0), tf.concat(changed, 0))
  return out


def random_grayscale(images, u, p=0.2):
  return apply_where(u[:, U["gray"]] < p, grayscale, images)


def blur_kernel_size(size):
  """About 10% of the image side, odd, at least 3 (23 at 224, 3 at 32 and 28)."""
  k = int(0.1 * size)
  return max(3, k + 1 - k % 2)


def gaussian_blur(images, u, p, sigma=(0.1, 2.0)):
  """float [B, H, W, C]: separable Gaussian blur with p, sigma ~ U[sigma], reflect padding."""
  if p <= 0.0:
    return images
  radius = blur_kernel_size(images.shape[1]) // 2
  channels = images.shape[-1]

  def blur(x, s):  # x [n, H, W, C], s [n]: fold the n examples into channels, one depthwise conv
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    weights = tf.exp(-taps[None] ** 2 / (2 * s[:, None] ** 2))
    weights = tf.repeat(weights / tf.reduce_sum(weights, axis=1, keepdims=True), channels, axis=0)
    shape = tf.shape(x)
    folded = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, shape[1], shape[2], -1])
    folded = tf.pad(folded, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    kernel = tf.transpose(weights)  # [k, n * C]
    folded = tf.nn.depthwise_conv2d(folded, kernel[:, None, :, None], [1] * 4, "VALID")
    folded = tf.nn.depthwise_conv2d(folded, kernel[None, :, :, None], [1] * 4, "VALID")
    return tf.transpose(tf.reshape(folded[0], [shape[1], shape[2], shape[0], channels]), [2, 0, 1, 3])

  s = sigma[0] + (sigma[1] - sigma[0]) * u[:, U["sigma"]]
  apply = tf.ones_like(s, tf.bool) if p >= 1.0 else u[:, U["blur"]] < p
  return tf.cond(tf.reduce_any(apply), lambda: apply_where(apply, blur, images, s), lambda: images)


def solarize(images, u, p, threshold=0.5):
  """Invert pixels >= threshold (pixel space [0, 1]) with probability p."""
  if p <= 0.0:
    return images
  return apply_where(u[:, U["solarize"]] < p,
                     lambda x: tf.where(x >= threshold, 1.0 - x, x), images)


# ------------------------------------------------------------------ views


PRETRAIN_CROP_SCALE = (0.08, 1.0)   # area fraction of the two augmented views (BYOL / SimCLR)


def pretrain_geometry(image, seed, size, crop_scale=PRETRAIN_CROP_SCALE):
  """Per example: uint8 [H, W, C] -> {"x", "a1", "a2": uint8 [size, size, C], "u": [3, NUM_UNIFORMS]}.

  crop_scale: (min, max) area fraction of a1 / a2's random resized crops.
  """
  u = uniforms(seed, 3)
  crops = resized_crops(image, u[1:], size, scale=tuple(crop_scale))
  return {"x": center_view(image, size), "a1": crops[0], "a2": crops[1], "u": u}


def pretrain_photometry(batch):
  """Per batch: pretrain_geometry outputs stacked on [B] -> {"x", "a1", "a2"} uint8 [B, S, S, C]."""
  u = batch["u"]
  views = {"x": flip(batch["x"], u[:, 0])}
  for name, k, blur_p, solarize_p in (("a1", 1, 1.0, 0.0), ("a2", 2, 0.1, 0.2)):
    v = flip(to_float(batch[name]), u[:, k])
    v = random_grayscale(color_jitter(v, u[:, k]), u[:, k])
    views[name] = to_uint8(solarize(gaussian_blur(v, u[:, k], blur_p), u[:, k], solarize_p))
  return views


def pretrain_views(image, seed, size, crop_scale=PRETRAIN_CROP_SCALE):
  """uint8 [H, W, C] -> {"x", "a1", "a2"}: uint8 [size, size, C] (both stages, one example)."""
  geometry = pretrain_geometry(image, seed, size, crop_scale)
  views = pretrain_photometry({k: v[None] for k, v in geometry.items()})
  return {k: v[0] for k, v in views.items()}


def eval_view(image, size):
  """uint8 [H, W, C] -> uint8 [size, size, C]: resize the short side + center crop."""
  return center_view(image, size)


def finetune_view(image, seed, size, augment):
  """uint8 [H, W, C] -> uint8 [size, size, C] for fine-tuning (one example).

  augment: "none" (center view only; CIFAR-10, Fashion-MNIST), "weak" (center
  view + flip), "strong" (random resized crop 0.4-1 + flip), "autoaug"
  ("strong" then RandAugment rand-m9-mstd0.5-inc1, `randaugment.rand_augment`).
  """
  if augment not in FINETUNE_AUGMENTS:
    raise ValueError(f"augment={augment!r} is not one of {FINETUNE_AUGMENTS}.")
  if augment == "none":
    return center_view(image, size)
  u = uniforms(seed)
  if augment == "weak":
    return flip(center_view(image, size)[None], u)[0]
  view = flip(resized_crops(image, u, size, scale=(0.4, 1.0)), u)[0]
  if augment == "autoaug":
    view = randaugment.rand_augment(view, tf.random.experimental.stateless_fold_in(seed, 1))
  return view
