"""RandAugment as timm's "rand-m9-mstd0.5-inc1", in TensorFlow ops on stateless seeds.

The ImageNet σ = 0.25 fine-tuning augmentation ("autoaug" in
`rrcm_jax.data.augment.finetune_view`; docs/method.md, Fine-tuning): 2 ops
drawn uniformly with replacement from the 15 "increasing" ops of `OPS`, each
applied with probability 0.5 at magnitude ~ N(9, 0.5) clipped to [0, 10].
Ops act on uint8 values held as float [0, 255] and round after each op, as
PIL does; geometric ops fill with timm's ImageNet mean. Our own
implementation, because Keras 3's RandAugment layer draws from a stateful
generator (no exact resume) and has a different op set.
"""
import functools
import math

from rrcm_jax.data import import_tensorflow

tf = import_tensorflow()


def _luma(img):
  """PIL convert("L"): rounded 0.299 R + 0.587 G + 0.114 B, [H, W, 1]."""
  if img.shape[-1] == 1:
    return img
  return tf.floor(tf.reduce_sum(img * [0.299, 0.587, 0.114], axis=-1, keepdims=True) + 0.5)


def _blend(degenerate, img, factor):
  """PIL Image.blend: truncated to uint8 values."""
  return tf.floor(tf.clip_by_value(degenerate + factor * (img - degenerate), 0.0, 255.0))


def _affine(img, matrix):
  """PIL Image.transform(AFFINE, (a, b, c, d, e, f), BILINEAR).

  Output pixel centre (x, y) samples the input at (a x + b y + c, d x + e y + f),
  in PIL's coordinates where pixel centres sit at +0.5.
  """
  a, b, c, d, e, f = tf.unstack(matrix)
  transform = tf.stack([a, b, c + 0.5 * (a + b - 1.0), d, e, f + 0.5 * (d + e - 1.0), 0.0, 0.0])
  fill = tf.constant([124.0, 116.0, 104.0] if img.shape[-1] == 3 else [128.0])
  stack = tf.concat([img, tf.ones_like(img[..., :1])], axis=-1)[None]
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=stack, transforms=transform[None], output_shape=tf.shape(img)[:2], fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return warped[..., :-1] + (1.0 - warped[..., -1:]) * fill


def _rotate(img, mag, sign):
  """PIL Image.rotate (counter-clockwise about the centre) by 30 * mag / 10 degrees."""
  angle = -sign * mag * 3.0 * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  shape = tf.cast(tf.shape(img), tf.float32)
  cx, cy = shape[1] / 2, shape[0] / 2
  return _affine(img, tf.stack([cos, sin, cx - cos * cx - sin * cy,
                                -sin, cos, cy + sin * cx - cos * cy]))


def _shear(img, mag, sign, axis):
  level = sign * mag * 0.03
  return _affine(img, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0] if axis == 1 else
                               [1.0, 0.0, 0.0, level, 1.0, 0.0]))


def _translate(img, mag, sign, axis):
  pixels = sign * mag * 0.045 * tf.cast(tf.shape(img)[axis], tf.float32)
  return _affine(img, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0] if axis == 1 else
                               [1.0, 0.0, 0.0, 0.0, 1.0, pixels]))


def _auto_contrast(img, mag, sign):
  del mag, sign
  lo = tf.reduce_min(img, axis=[0, 1])
  hi = tf.reduce_max(img, axis=[0, 1])
  scaled = tf.floor((img - lo) * 255.0 / tf.maximum(hi - lo, 1.0))
  return tf.where(hi > lo, scaled, img)


def _equalize_channel(ch):
  """PIL ImageOps.equalize on one channel of uint8 values (float [H, W])."""
  hist = tf.math.bincount(tf.cast(ch, tf.int32), minlength=256, maxlength=256)
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)[:, 0]))
  step = (tf.reduce_sum(hist) - last) // 255
  lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
  lut = tf.cast(tf.minimum(lut, 255), tf.float32)
  return tf.where(step > 0, tf.gather(lut, tf.cast(ch, tf.int32)), ch)


def _equalize(img, mag, sign):
  del mag, sign
  return tf.stack([_equalize_channel(img[..., c]) for c in range(img.shape[-1])], axis=-1)


def _sharpness(img, mag, sign):
  """PIL ImageEnhance.Sharpness: blend with the 3x3 smooth filter (borders kept)."""
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  c = img.shape[-1]
  kernels = tf.tile(kernel[:, :, None, None], [1, 1, c, 1])
  smooth = tf.round(tf.nn.depthwise_conv2d(img[None], kernels, [1] * 4, "VALID")[0])
  smooth = tf.pad(smooth - img[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]]) + img
  return _blend(smooth, img, _factor(mag, sign))


def _factor(mag, sign):
  """Enhancement factor of the "Increasing" colour ops: 1 ± 0.09 mag."""
  return 1.0 + sign * mag * 0.09


def _solarize(img, mag, sign):
  """SolarizeIncreasing: invert values >= 256 - 25.6 mag."""
  del sign
  return tf.where(img >= 256.0 - tf.floor(mag * 25.6), 255.0 - img, img)


def _solarize_add(img, mag, sign):
  """SolarizeAdd: add 11 mag to values below 128 (capped at 255)."""
  del sign
  return tf.where(img < 128.0, tf.minimum(img + tf.floor(mag * 11.0), 255.0), img)


def _contrast(img, mag, sign):
  """ContrastIncreasing: blend with the rounded mean luma."""
  return _blend(tf.floor(tf.reduce_mean(_luma(img)) + 0.5), img, _factor(mag, sign))


def _posterize(img, mag, sign):
  """PosterizeIncreasing: keep 4 - floor(0.4 mag) high bits (0 bits at mag 10: black)."""
  del sign
  step = 2.0 ** (4.0 + tf.floor(mag * 0.4))
  return tf.floor(img / step) * step


OPS = (
    _auto_contrast,
    _equalize,
    lambda img, mag, sign: 255.0 - img,  # Invert
    _rotate,
    _posterize,
    _solarize,
    _solarize_add,
    lambda img, mag, sign: _blend(_luma(img), img, _factor(mag, sign)),  # ColorIncreasing
    _contrast,
    lambda img, mag, sign: _blend(0.0, img, _factor(mag, sign)),  # BrightnessIncreasing
    _sharpness,
    functools.partial(_shear, axis=1),  # ShearX
    functools.partial(_shear, axis=0),  # ShearY
    functools.partial(_translate, axis=1),  # TranslateXRel
    functools.partial(_translate, axis=0),  # TranslateYRel
)


def rand_augment(image, seed, num_layers=2, magnitude=9.0, magnitude_std=0.5, prob=0.5):
  """uint8 [H, W, C] -> uint8 [H, W, C]: timm RandAugment "rand-m9-mstd0.5-inc1".

  `seed`: int [2] stateless seed; the same seed gives the same pixels eagerly
  and inside tf.data. Pixel values stay in uint8 [0, 255] (pixel space).
  """
  img = tf.cast(image, tf.float32)
  u = tf.random.stateless_uniform([num_layers, 3], seed)
  normal = tf.random.stateless_normal([num_layers],
                                      tf.random.experimental.stateless_fold_in(seed, 1))
  for layer in range(num_layers):
    op = tf.minimum(tf.cast(u[layer, 0] * len(OPS), tf.int32), len(OPS) - 1)
    mag = tf.clip_by_value(magnitude + magnitude_std * normal[layer], 0.0, 10.0)
    sign = tf.where(u[layer, 2] < 0.5, -1.0, 1.0)
    branches = [functools.partial(f, img, mag, sign) for f in OPS]
    # pylint: disable=cell-var-from-loop
    applied = lambda: tf.round(tf.ensure_shape(tf.switch_case(op, branches), img.shape))
    img = tf.cond(u[layer, 1] < prob, applied, lambda: img)
    # pylint: enable=cell-var-from-loop
  return tf.cast(tf.clip_by_value(img, 0.0, 255.0), tf.uint8)
