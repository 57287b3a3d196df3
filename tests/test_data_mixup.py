"""rrcm_jax.data.mixup: mixup / cutmix / label smoothing in JAX."""
import jax
import jax.numpy as jnp
import numpy as np

from rrcm_jax.data import mixup

K = 10


def _batch(b=8, h=16, w=12):
  images = jnp.arange(b, dtype=jnp.float32)[:, None, None, None] * jnp.ones([b, h, w, 3])
  labels = jnp.arange(b) % K
  return images, labels


def test_label_smoothing_values():
  t = mixup.smooth_labels(jnp.array([3, 0]), K, 0.1)
  np.testing.assert_allclose(t[0, 3], 0.91, rtol=1e-6)
  np.testing.assert_allclose(t[0, 0], 0.01, rtol=1e-6)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)


def test_no_mixing_gives_smoothed_one_hot():
  images, labels = _batch()
  out, targets = mixup.mixup_cutmix(jax.random.key(0), images, labels, K, mixup_alpha=0.0,
                                    cutmix_alpha=0.0, label_smoothing=0.0)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_array_equal(targets, jax.nn.one_hot(labels, K))


def _lam(images, labels, out, targets):
  """lambda read off the targets of example 0 (label 0, mirrored partner label 7)."""
  return float(targets[0, labels[0]])


def test_mixup_images_and_targets_agree():
  images, labels = _batch()
  fn = jax.jit(lambda k: mixup.mixup_cutmix(k, images, labels, K, mixup_alpha=0.8,
                                            cutmix_alpha=0.0, label_smoothing=0.0))
  lams = []
  for i in range(50):
    out, targets = fn(jax.random.key(i))
    lam = _lam(images, labels, out, targets)
    lams.append(lam)
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], atol=1e-5)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  assert 0.0 <= min(lams) and max(lams) <= 1.0
  assert abs(np.mean(lams) - 0.5) < 0.1  # Beta(0.8, 0.8) is symmetric


def test_cutmix_box_fraction_is_lambda():
  images, labels = _batch()
  fn = jax.jit(lambda k: mixup.mixup_cutmix(k, images, labels, K, mixup_alpha=0.0,
                                            cutmix_alpha=1.0, label_smoothing=0.1))
  for i in range(30):
    out, targets = fn(jax.random.key(i))
    pasted = np.mean(np.asarray(out[0, :, :, 0]) == 7.0)  # pixels from the mirrored example
    lam_targets = (float(targets[0, 0]) - 0.01) / 0.9
    np.testing.assert_allclose(1.0 - pasted, lam_targets, atol=1e-5)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    assert targets.min() >= 0.01 - 1e-7  # smoothing floor kept


def test_switch_uses_both_modes_about_half_the_time():
  images, labels = _batch()
  fn = jax.jit(lambda k: mixup.mixup_cutmix(k, images, labels, K))
  cutmix = 0
  for i in range(200):
    out, _ = fn(jax.random.key(i))
    values = np.unique(np.asarray(out[0, :, :, 0]))
    cutmix += bool(np.all(np.isin(values, [0.0, 7.0])))  # only whole pixels of either image
  assert 70 < cutmix < 130


def test_cutmix_mask_area():
  mask = mixup.cutmix_mask(jax.random.key(1), 32, 32, jnp.float32(0.75))
  assert mask.shape == (32, 32) and mask.dtype == jnp.bool_
  assert mask.sum() <= 16 * 16
