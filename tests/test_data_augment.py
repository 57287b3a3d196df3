"""rrcm_jax.data.augment and .randaugment: each op eagerly and inside tf.data, distributions, PIL parity."""
import numpy as np
import pytest

from rrcm_jax.data import augment as A
from rrcm_jax.data import randaugment

tf = A.tf
SEED = tf.constant([7, 11], tf.int64)


def _image(h, w, c, seed=0):
  rng = np.random.default_rng(seed)
  base = np.linspace(0, 1, w)[None, :, None] * np.linspace(0.3, 1, h)[:, None, None]
  noise = rng.uniform(0, 0.3, (h, w, c))
  return tf.constant(np.clip((base + noise) * 200, 0, 255).astype(np.uint8))


def _eager_and_in_data(fn, *args):
  """fn(*args) eagerly and as a tf.data map; asserts they agree exactly; returns the eager result."""
  eager = fn(*args)
  graph = next(iter(tf.data.Dataset.from_tensors(args).map(fn)))
  tf.nest.map_structure(lambda a, b: np.testing.assert_array_equal(a.numpy(), b.numpy()), eager, graph)
  return eager


def _u(n, seed=0):
  return tf.random.stateless_uniform([n, A.NUM_UNIFORMS], [seed, 1])


PER_EXAMPLE_OPS = {
    "center_view_small": (lambda im: A.center_view(im, 32), (_image(32, 32, 3),)),
    "center_view_large": (lambda im: A.center_view(im, 24), (_image(120, 100, 3),)),
    "resized_crops": (lambda im, s: A.resized_crops(im, A.uniforms(s, 2), 16), (_image(40, 30, 3), SEED)),
    "resized_crops_large": (lambda im, s: A.resized_crops(im, A.uniforms(s, 2), 8), (_image(90, 70, 1), SEED)),
    "pretrain_views_rgb": (lambda im, s: A.pretrain_views(im, s, 32), (_image(32, 32, 3), SEED)),
    "pretrain_views_gray": (lambda im, s: A.pretrain_views(im, s, 28), (_image(28, 28, 1), SEED)),
    "pretrain_views_large": (lambda im, s: A.pretrain_views(im, s, 48), (_image(130, 100, 3), SEED)),
    "rand_augment": (randaugment.rand_augment, (_image(24, 20, 3), SEED)),
    **{f"finetune_{a}": ((lambda im, s, a=a: A.finetune_view(im, s, 24, a)), (_image(40, 30, 3), SEED))
       for a in A.FINETUNE_AUGMENTS},
}
BATCH_OPS = {
    "flip": A.flip,
    "color_jitter": A.color_jitter,
    "random_grayscale": A.random_grayscale,
    "gaussian_blur": lambda x, u: A.gaussian_blur(x, u, 0.5),
    "solarize": lambda x, u: A.solarize(x, u, 0.5),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE_OPS))
def test_per_example_op_same_eagerly_and_in_tf_data(name):
  fn, args = PER_EXAMPLE_OPS[name]
  out = _eager_and_in_data(fn, *args)
  for leaf in tf.nest.flatten(out):
    assert leaf.dtype == tf.uint8


@pytest.mark.parametrize("name", sorted(BATCH_OPS))
@pytest.mark.parametrize("channels", [1, 3])
def test_batch_op_same_eagerly_and_in_tf_data(name, channels):
  images = A.to_float(tf.stack([_image(16, 16, channels, seed=i) for i in range(6)]))
  out = _eager_and_in_data(BATCH_OPS[name], images, _u(6))
  assert out.shape == images.shape
  # Per-example: an example's result does not depend on its batch mates.
  alone = BATCH_OPS[name](images[2:3], _u(6)[2:3])
  np.testing.assert_allclose(alone[0].numpy(), out[2].numpy(), atol=1e-6)


def test_pretrain_views_shapes_determinism_and_seed_dependence():
  image = _image(32, 32, 3)
  views = A.pretrain_views(image, SEED, 32)
  assert {k: v.shape for k, v in views.items()} == {k: (32, 32, 3) for k in ("x", "a1", "a2")}
  again = A.pretrain_views(image, SEED, 32)
  other = A.pretrain_views(image, SEED + 1, 32)
  for k in views:
    np.testing.assert_array_equal(views[k], again[k])
  assert not np.array_equal(views["a1"], other["a1"])
  assert not np.array_equal(views["a1"], views["a2"])
  # x at 32x32 is the image itself, maybe flipped.
  assert (np.array_equal(views["x"], image) or np.array_equal(views["x"], image[:, ::-1]))


def test_pretrain_crop_scale_sets_the_augmentation_strength():
  image = _image(32, 32, 3)
  whole = A.pretrain_geometry(image, SEED, 32, crop_scale=(1.0, 1.0))
  for k in ("a1", "a2"):   # the whole (square) image, resized 32 -> 32: the image itself
    np.testing.assert_array_equal(whole[k], image)
  strong = A.pretrain_geometry(image, SEED, 32)
  assert not np.array_equal(strong["a1"], image)
  np.testing.assert_array_equal(strong["x"], whole["x"])


def test_center_view_halves_then_resizes_and_crops_the_center():
  # A horizontal ramp 400 x 600 -> 100: the short side halves twice (400 -> 100), the long to 150,
  # then the center 100 columns are kept: columns 25..124 of the 150.
  ramp = np.tile(np.linspace(0, 255, 600, dtype=np.float32)[None, :, None], [400, 1, 3])
  out = A.center_view(tf.constant(ramp.round().astype(np.uint8)), 100).numpy().astype(np.float32)
  expected = np.linspace(0, 255, 150)[25:125]
  assert out.shape == (100, 100, 3)
  np.testing.assert_allclose(out[50, :, 0], expected, atol=2.5)
  constant = A.center_view(tf.fill([300, 500, 3], tf.constant(77, tf.uint8)), 64)
  assert np.all(constant.numpy() == 77)


def test_resized_crop_matches_bilinear_resize_of_its_box():
  # Half-pixel bilinear sampling of the box; samples that fall within half a source pixel of
  # the box's border read the neighbouring pixels outside it (tf.image.resize clamps instead).
  image = _image(30, 40, 3)
  u = _u(5, seed=3)
  crops = A.resized_crops(image, u, 24).numpy().astype(np.float32)
  top, left, h, w = (t.numpy().astype(int) for t in A.crop_box(u, 30, 40))
  for i in range(5):
    box = image[top[i]:top[i] + h[i], left[i]:left[i] + w[i]]
    ref = tf.image.resize(A.to_float(box), [24, 24], method="bilinear").numpy() * 255
    my, mx = int(np.ceil(24 / (2 * h[i]))), int(np.ceil(24 / (2 * w[i])))
    np.testing.assert_allclose(crops[i, my:24 - my, mx:24 - mx], ref[my:24 - my, mx:24 - mx], atol=1.01)


def test_crop_boxes_stay_in_scale_and_ratio_ranges():
  u = _u(4000, seed=5)
  top, left, h, w = (t.numpy() for t in A.crop_box(u, 800, 1000))
  assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + h <= 800) and np.all(left + w <= 1000)
  area = h * w / 800_000
  assert area.min() >= 0.08 * 0.99 and area.max() <= 1.0
  assert area.min() < 0.1 and area.max() > 0.9  # the whole range is used
  ratio = w / h
  assert ratio.min() >= 0.75 * 0.99 and ratio.max() <= 4 / 3 * 1.01
  top, left, h, w = (t.numpy() for t in A.crop_box(u, 32, 32, scale=(0.4, 1.0)))
  assert np.all(top + h <= 32) and np.all(left + w <= 32)
  assert (h * w / 1024).min() >= 0.4 * 0.9


def _photometry(image, n, seed=0):
  """pretrain_photometry of n copies of one uint8 [S, S, C] image (float outputs in [0, 1])."""
  batch = {k: tf.repeat(image[None], n, axis=0) for k in ("x", "a1", "a2")}
  batch["u"] = tf.random.stateless_uniform([n, 3, A.NUM_UNIFORMS], [seed, 2])
  return {k: A.to_float(v).numpy() for k, v in A.pretrain_photometry(batch).items()}


def test_flip_frequency_is_one_half():
  image = _image(8, 8, 3)
  views = _photometry(image, 3000)
  flipped = np.all(views["x"] == A.to_float(image[:, ::-1]).numpy(), axis=(1, 2, 3))
  assert abs(flipped.mean() - 0.5) < 0.04


def test_grayscale_frequency_is_one_fifth_in_both_views():
  image = tf.constant(np.tile(np.array([150, 80, 50], np.uint8), [8, 8, 1]))
  views = _photometry(image, 3000, seed=1)
  for k in ("a1", "a2"):
    gray = np.ptp(views[k], axis=-1).max(axis=(1, 2)) < 1.5 / 255
    assert abs(gray.mean() - 0.2) < 0.03, k
  assert np.ptp(views["x"], axis=-1).min() > 0.1  # x is never recoloured


def test_solarize_only_in_view_two_with_frequency_one_fifth():
  # White stays >= 0.6 under jitter, grayscale and blur; solarized it drops to <= 0.4.
  white = tf.fill([8, 8, 3], tf.constant(255, tf.uint8))
  views = _photometry(white, 3000, seed=2)
  assert np.all(views["a1"].mean(axis=(1, 2, 3)) > 0.5)
  solarized = views["a2"].mean(axis=(1, 2, 3)) < 0.5
  assert abs(solarized.mean() - 0.2) < 0.03


def test_jitter_probability_and_single_channel_ops():
  image = A.to_float(tf.stack([_image(8, 8, 1)] * 2000))
  out = A.color_jitter(image, _u(2000, seed=4)).numpy()
  changed = np.abs(out - image.numpy()).max(axis=(1, 2, 3)) > 1e-6
  assert abs(changed.mean() - 0.8) < 0.04
  assert A.random_grayscale(image, _u(2000)).shape == image.shape  # no-op for one channel


def test_blur_sigma_range_and_kernel_size():
  assert [A.blur_kernel_size(s) for s in (28, 32, 96, 224)] == [3, 3, 9, 23]
  impulse = np.zeros([1, 33, 33, 1], np.float32)
  impulse[0, 16, 16] = 1.0
  for value, sigma in ((0.0, 0.1), (1.0, 2.0)):
    u = np.full([1, A.NUM_UNIFORMS], 0.5, np.float32)
    u[0, A.U["sigma"]] = value
    out = A.gaussian_blur(tf.constant(impulse), tf.constant(u), 1.0).numpy()[0, :, 16, 0]
    taps = np.exp(-np.arange(-1, 2) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    np.testing.assert_allclose(out[15:18], taps * taps[1], atol=1e-6)  # separable: k outer k
  blurred = A.gaussian_blur(tf.fill([2, 10, 10, 3], 0.3), _u(2), 1.0)
  np.testing.assert_allclose(blurred.numpy(), 0.3, atol=1e-6)


def test_rand_augment_ops_match_pil():
  from PIL import Image, ImageEnhance, ImageOps  # pylint: disable=g-import-not-at-top
  arr = np.asarray(_image(40, 60, 3, seed=3))
  im = Image.fromarray(arr)
  m, f, fill = 9.0, 1.81, (124, 116, 104)
  affine = lambda data: im.transform(im.size, Image.AFFINE, data, Image.BILINEAR, fillcolor=fill)
  reference = [ImageOps.autocontrast(im), ImageOps.equalize(im), ImageOps.invert(im),
               im.rotate(27, resample=Image.BILINEAR, fillcolor=fill), ImageOps.posterize(im, 1),
               ImageOps.solarize(im, 26), im.point([min(255, i + 99) if i < 128 else i for i in range(256)] * 3),
               ImageEnhance.Color(im).enhance(f), ImageEnhance.Contrast(im).enhance(f),
               ImageEnhance.Brightness(im).enhance(f), ImageEnhance.Sharpness(im).enhance(f),
               affine((1, 0.27, 0, 0, 1, 0)), affine((1, 0, 0, 0.27, 1, 0)),
               affine((1, 0, 0.405 * 60, 0, 1, 0)), affine((1, 0, 0, 0, 1, 0.405 * 40))]
  for k, (op, ref) in enumerate(zip(randaugment.OPS, reference)):
    out = np.round(op(tf.constant(arr, tf.float32), tf.constant(m), tf.constant(1.0)).numpy())
    diff = np.abs(out - np.asarray(ref, np.float32))
    if k in (3, 11, 12, 13, 14):  # geometric: border pixels differ
      assert diff.mean() < 1.5, k
    else:
      assert diff.max() <= 1.0, k


def test_finetune_view_rejects_unknown_augment():
  with pytest.raises(ValueError, match="augment='cutout'"):
    A.finetune_view(_image(8, 8, 3), SEED, 8, "cutout")
