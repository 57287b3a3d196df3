"""k-NN representation monitor: the vote, the evaluator, the noise conditioning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from rrcm_jax import denoiser, models
from rrcm_jax.evaluators import knn


def _clusters(rng, n, num_classes, dim, spread):
  labels = rng.integers(0, num_classes, n)
  centers = rng.normal(size=(num_classes, dim))
  return centers[labels] + spread * rng.normal(size=(n, dim)), labels


def _predict(bank, labels, queries, k, num_classes, temperature=0.07):
  return np.asarray(knn.knn_predict(knn.normalize(jnp.asarray(bank)), jnp.asarray(labels),
                                    knn.normalize(jnp.asarray(queries)), k=k,
                                    num_classes=num_classes, temperature=temperature))


def test_separated_classes_are_all_found():
  rng = np.random.default_rng(0)
  feats, labels = _clusters(rng, 600, 10, 32, spread=0.05)
  pred = _predict(feats[:500], labels[:500], feats[500:], k=20, num_classes=10)
  np.testing.assert_array_equal(pred, labels[500:])


def test_random_labels_give_chance():
  rng = np.random.default_rng(1)
  bank, queries = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
  bank_labels, labels = rng.integers(0, 10, 2000), rng.integers(0, 10, 2000)
  acc = np.mean(_predict(bank, bank_labels, queries, k=20, num_classes=10) == labels)
  assert abs(acc - 0.1) < 0.03    # binomial std at n = 2000: 0.0067


def test_votes_are_weighted_by_exp_similarity():
  """One close neighbour of class 0 against two farther ones of class 1: with a
  small temperature similarity wins, with a large one the count does."""
  bank = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])   # cosines 1, 0.6, 0.6
  labels = np.array([0, 1, 1])
  query = np.array([[1.0, 0.0]])
  assert _predict(bank, labels, query, k=3, num_classes=2, temperature=0.07)[0] == 0
  assert _predict(bank, labels, query, k=3, num_classes=2, temperature=10.0)[0] == 1
  # exp(1/T) vs 2 exp(0.6/T): class 0 wins exactly when T < 0.4 / ln 2 = 0.577.
  assert _predict(bank, labels, query, k=3, num_classes=2, temperature=0.57)[0] == 0
  assert _predict(bank, labels, query, k=3, num_classes=2, temperature=0.59)[0] == 1


def _images(rng, n, num_classes, size=8):
  """Each class a black-and-white pattern of its own plus pixel noise: separable in
  pixel space by cosine similarity."""
  patterns = np.random.default_rng(123).choice([0.0, 255.0], (num_classes, size, size, 1))
  labels = rng.integers(0, num_classes, n)
  x = patterns[labels] + rng.normal(0, 10, (n, size, size, 1))
  return np.clip(x, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def tiny():
  cfg = common.model_config(width=16, depth=1, num_heads=2, patch_size=4, image_size=8,
                            channels=1, proj_hidden=16, proj_out=8)
  x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,))
  params = models.rcm_encoder(cfg).init(jax.random.key(0), x, t)["params"]
  rng = np.random.default_rng(0)
  return knn.encoder_features_fn(cfg), params, _images(rng, 100, 4), _images(rng, 30, 4)


def test_evaluator_names_values_and_pixel_baseline(tiny):
  fn, params, (xtr, ytr), (xte, yte) = tiny
  ev = knn.KnnEvaluator(fn, xtr, ytr, xte, yte, levels=(0.0, 0.5, 1.0),
                        k=5, batch_size=16, pixel_baseline=True)
  out = dict(ev.run(params))
  assert list(out) == ["knn_clean", "knn_noisy_0.5", "knn_noisy_1.0", "knn_pixels_clean",
                       "knn_pixels_noisy_0.5", "knn_pixels_noisy_1.0"]
  assert all(0.0 <= v <= 1.0 for v in out.values())
  assert out["knn_pixels_clean"] == 1.0          # the classes differ in mean colour
  assert dict(ev.run(params)) == out             # deterministic noise
  drowned = knn.KnnEvaluator(knn.pixel_features, xtr, ytr, xte, yte, levels=(50.0,), k=5)
  assert dict(drowned.run(None))["knn_noisy_50.0"] < 0.7   # noise 50x the signal: near chance


def test_batch_size_does_not_change_the_result(tiny):
  fn, params, (xtr, ytr), (xte, yte) = tiny
  run = lambda bs: dict(knn.KnnEvaluator(fn, xtr, ytr, xte, yte,
                                         k=5, batch_size=bs).run(params))
  a, b = run(7), run(32)
  assert a.keys() == b.keys()
  for name in a:
    assert a[name] == pytest.approx(b[name], abs=1.5 / len(yte)), name   # a near-tie may flip


def test_encoder_is_conditioned_on_the_nearest_grid_point(tiny):
  fn, params, (xtr, ytr), (xte, yte) = tiny
  ev = knn.KnnEvaluator(fn, xtr, ytr, xte, yte, num_scales=81, k=5)
  assert ev.grid_sigmas[0.0] == pytest.approx(0.002)
  assert ev.grid_sigmas[0.5] == pytest.approx(float(denoiser.karras_sigma(53, 81)))
  assert ev.grid_sigmas[1.0] == pytest.approx(float(denoiser.karras_sigma(48, 81)))
  # The features at σ are the encoder's h at c_in(σ)·x and τ(σ).
  x = denoiser.pixels_to_model(jnp.asarray(xte[:4]))
  sigma = ev.grid_sigmas[1.0]
  cfg = common.model_config(width=16, depth=1, num_heads=2, patch_size=4, image_size=8,
                            channels=1, proj_hidden=16, proj_out=8)
  want = models.rcm_encoder(cfg).vit.apply({"params": params["vit"]}, denoiser.c_in(sigma) * x,
                                           denoiser.time_condition(jnp.full((4,), sigma)))[1]
  got = fn(params, x, sigma)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bad_arguments_are_refused(tiny):
  fn, _, (xtr, ytr), (xte, yte) = tiny
  with pytest.raises(ValueError, match="k=200"):
    knn.KnnEvaluator(fn, xtr, ytr, xte, yte, k=200)
  with pytest.raises(ValueError, match="bank"):
    knn.KnnEvaluator(fn, xtr, ytr, xte, yte, bank="noisy")
  with pytest.raises(ValueError, match="levels"):
    knn.KnnEvaluator(fn, xtr, ytr, xte, yte, levels=(-1.0,))
  with pytest.raises(ValueError, match="train_labels"):
    knn.KnnEvaluator(fn, xtr, ytr[:-1], xte, yte)
  with pytest.raises(ValueError, match="feature"):
    knn.encoder_features_fn(common.model_config(), feature="z")
