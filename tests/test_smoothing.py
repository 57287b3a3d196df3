"""Tests of the randomized-smoothing sampler, CERTIFY and PREDICT (rrcm_jax/smoothing.py).

The base classifier with a closed-form p_A is linear in pixel space: class 0
iff u . v + c > 0 for v = x + sigma * eps, so p_A = Phi((u . x + c) / (sigma ||u||)).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P
from scipy import stats

from rrcm_jax import smoothing

SHAPE = (4, 4, 1)


def linear_logits(params, x_model):
  """Two-class linear classifier of the pixel-space input v = (x_model + 1) / 2."""
  pixels = (x_model + 1.0) / 2.0
  score = jnp.einsum("bhwc,hwc->b", pixels, params["u"]) + params["c"]
  return jnp.stack([score, -score], axis=-1)


def linear_problem(p_a, sigma, seed=0):
  """(params, x) of the linear classifier whose class 0 has probability p_a under noise sigma."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=SHAPE).astype(np.float32)
  u /= np.linalg.norm(u) * 0.5  # ||u|| = 2
  x = rng.uniform(size=SHAPE).astype(np.float32)
  margin = sigma * np.linalg.norm(u) * stats.norm.ppf(p_a)
  return {"u": u, "c": np.float32(margin - np.sum(u * x))}, x


def mlp_logits(params, x_model):
  """A tiny 5-class MLP on model-space inputs: counts spread over several classes."""
  hidden = jnp.tanh(x_model.reshape(x_model.shape[0], -1) @ params["w1"])
  return hidden @ params["w2"]


def mlp_problem():
  rng = np.random.default_rng(1)
  params = {"w1": rng.normal(size=(6 * 6 * 3, 16)).astype(np.float32) * 0.3,
            "w2": rng.normal(size=(16, 5)).astype(np.float32)}
  images = rng.uniform(size=(2, 6, 6, 3)).astype(np.float32)
  return params, images


def data_mesh(num_devices):
  devices = jax.devices()
  assert len(devices) >= 8, "tests/conftest.py must simulate 8 CPU devices"
  return Mesh(np.array(devices[:num_devices]), ("data",))


def test_lower_bound_is_clopper_pearson():
  n_a, n, alpha = np.array([0, 1, 37, 99, 100]), 100, 0.001
  bound = smoothing.lower_confidence_bound(n_a, n, alpha)
  assert bound[0] == 0.0 and np.all(np.diff(bound) > 0)
  # Defining property: P(X >= n_a | p = bound) = alpha for X ~ Bin(n, bound).
  np.testing.assert_allclose(stats.binom.sf(n_a[1:] - 1, n, bound[1:]), alpha, rtol=1e-6)
  assert smoothing.lower_confidence_bound(100, 100, alpha) == pytest.approx(alpha ** (1 / 100))
  assert isinstance(smoothing.lower_confidence_bound(0, 10, alpha), float)


def test_lower_bound_coverage_numpy():
  """Clopper-Pearson holds its level for several (n, p): failures <= alpha, decisively."""
  rng = np.random.default_rng(0)
  alpha, repeats = 0.05, 4000
  for n in (10, 100, 1000):
    for p in (0.5, 0.9, 0.99):
      n_a = rng.binomial(n, p, size=repeats)
      failures = np.sum(smoothing.lower_confidence_bound(n_a, n, alpha) > p)
      assert failures <= 250, (n, p, failures)  # Bin(4000, 0.05): mean 200, sd 14


def test_sampler_coverage_and_noise_level():
  """Real sampler, 400 images of 100 samples: the bound covers p_A in >= 1 - alpha of them."""
  p_a, sigma, alpha, repeats, n = 0.9, 0.5, 0.05, 400, 100
  params, x = linear_problem(p_a, sigma)
  sampler = smoothing.Sampler(linear_logits, 2, sigma, chunk_size=128)
  images = np.broadcast_to(x, (repeats,) + SHAPE)
  counts = sampler.sample_counts(params, images, np.arange(repeats), smoothing.ESTIMATION_STREAM, n)
  assert counts.shape == (repeats, 2) and np.all(counts.sum(1) == n)
  n_a = counts[:, 0]
  # Noise std sigma in pixel space: the frequency of class 0 is p_A (2 sigma would give 0.74).
  assert abs(n_a.mean() / n - p_a) < 0.008  # 5 standard errors
  assert 0.7 < n_a.var() / (n * p_a * (1 - p_a)) < 1.3  # independent samples and images
  failures = np.sum(smoothing.lower_confidence_bound(n_a, n, alpha) > p_a)
  assert failures <= 36  # Bin(400, 0.05): mean 20, sd 4.4
  assert np.sum(n_a / n > p_a) > 100  # the point estimate would fail this test


def test_radius_approaches_closed_form():
  p_a, sigma = 0.9, 0.25
  params, x = linear_problem(p_a, sigma, seed=2)
  true_radius = sigma * stats.norm.ppf(p_a)
  sampler = smoothing.Sampler(linear_logits, 2, sigma, chunk_size=1024)
  gaps = []
  for n in (1_000, 10_000, 100_000):
    prediction, radius = smoothing.certify(sampler, params, x, 0, 100, n, 0.001)
    assert prediction == 0 and 0 < radius < true_radius
    gaps.append(true_radius - radius)
  assert gaps[0] > gaps[1] > gaps[2]
  assert gaps[2] < 0.035 * sigma  # expected 0.017 sigma at n = 1e5, alpha = 0.001


def test_counts_independent_of_devices_chunks_and_batching():
  params, images = mlp_problem()
  indices, n = np.array([3, 7]), 1000
  reference = None
  for mesh, chunk in [(None, 64), (data_mesh(1), 64), (data_mesh(8), 64), (data_mesh(8), 48)]:
    sampler = smoothing.Sampler(mlp_logits, 5, 0.5, chunk_size=chunk, mesh=mesh)
    counts = sampler.sample_counts(params, images, indices, smoothing.ESTIMATION_STREAM, n)
    if reference is None:
      reference = counts
      assert np.all(counts.sum(1) == n) and np.sum(counts[0] > 50) >= 2  # spread over classes
    np.testing.assert_array_equal(counts, reference)
    single = sampler.sample_counts(params, images[1:], indices[1:], smoothing.ESTIMATION_STREAM, n)
    np.testing.assert_array_equal(single[0], reference[1])


def test_noise_sharded_over_data_axis():
  params, images = mlp_problem()
  sharded = smoothing.Sampler(mlp_logits, 5, 0.5, chunk_size=64, mesh=data_mesh(8))
  x_model = sharded.noisy_inputs(images, [3, 7], smoothing.SELECTION_STREAM, 100, 64)
  assert x_model.shape == (128, 6, 6, 3) and x_model.sharding.spec == P("data")
  assert {s.data.shape[0] for s in x_model.addressable_shards} == {16}
  plain = smoothing.Sampler(mlp_logits, 5, 0.5, chunk_size=64)
  expected = plain.noisy_inputs(images, [3, 7], smoothing.SELECTION_STREAM, 100, 64)
  np.testing.assert_array_equal(np.asarray(x_model), np.asarray(expected))
  # Model space: mean 2x - 1, noise std 2 sigma.
  noise = np.asarray(expected).reshape(64, 2, 6, 6, 3) - (2 * images - 1)
  assert abs(noise.std() - 2 * 0.5) < 0.03


def test_streams_and_images_draw_different_noise():
  params, images = mlp_problem()
  sampler = smoothing.Sampler(mlp_logits, 5, 0.5, chunk_size=64)
  draw = lambda index, stream: np.asarray(sampler.noisy_inputs(images[:1], [index], stream, 0, 8))
  np.testing.assert_array_equal(draw(3, 0), draw(3, 0))
  assert not np.allclose(draw(3, 0), draw(3, 1))
  assert not np.allclose(draw(3, 0), draw(4, 0))
  assert sampler._noisy_fns[8]._cache_size() == 1   # pylint: disable=protected-access  (one compile)
  counts = lambda stream: sampler.sample_counts(params, images[:1], [3], stream, 1000)[0]
  assert not np.array_equal(counts(smoothing.SELECTION_STREAM), counts(smoothing.ESTIMATION_STREAM))
  # certify = the decision on the selection and estimation streams' counts.
  expected = smoothing.certify_from_counts(
      sampler.sample_counts(params, images[:1], [3], smoothing.SELECTION_STREAM, 100)[0],
      counts(smoothing.ESTIMATION_STREAM), 0.5, 0.001)
  assert smoothing.certify(sampler, params, images[0], 3, 100, 1000, 0.001) == expected


def test_no_retrace_across_images_and_n():
  params, images = mlp_problem()
  sampler = smoothing.Sampler(mlp_logits, 5, 0.25, chunk_size=256)
  smoothing.certify(sampler, params, images[0], 0, 100, 1000, 0.001)
  assert sampler.traces == {128: 1, 256: 1}  # n0 = 100 uses a 128 chunk, n the full chunk
  rng = np.random.default_rng(0)
  for index, n in [(1, 300), (2, 2000), (3, 777)]:
    x = rng.uniform(size=images.shape[1:]).astype(np.float32)
    smoothing.certify(sampler, params, x, index, 100, n, 0.001)
  smoothing.predict(sampler, params, images[1], 9, 500, 0.001)
  assert sampler.trace_count == 2


def test_predict_abstains_on_coin_flip_and_not_when_confident():
  sigma = 0.5
  coin_params, x = linear_problem(0.5, sigma)
  sampler = smoothing.Sampler(linear_logits, 2, sigma, chunk_size=512)
  assert smoothing.predict(sampler, coin_params, x, 0, 2000, 0.001) == smoothing.ABSTAIN
  assert smoothing.certify(sampler, coin_params, x, 0, 100, 2000, 0.001) == (smoothing.ABSTAIN, 0.0)
  confident_params, x = linear_problem(0.99, sigma)
  assert smoothing.predict(sampler, confident_params, x, 0, 2000, 0.001) == 0
  assert smoothing.predict_from_counts(np.array([500, 500, 0]), 0.001) == smoothing.ABSTAIN
  assert smoothing.predict_from_counts(np.array([0, 400, 600]), 0.001) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(n0=0), "n0 must be an integer >= 1"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(n=1.5), "n must be an integer >= 1"),
    (dict(alpha=0.0), r"alpha must be a number in \(0, 1\)"),
    (dict(alpha=1.0), r"alpha must be a number in \(0, 1\)"),
])
def test_bad_certify_arguments(kwargs, message):
  params, x = linear_problem(0.9, 0.5)
  sampler = smoothing.Sampler(linear_logits, 2, 0.5, chunk_size=64)
  arguments = dict(n0=100, n=1000, alpha=0.001) | kwargs
  with pytest.raises(ValueError, match=message):
    smoothing.certify(sampler, params, x, 0, **arguments)
  assert sampler.trace_count == 0  # rejected before any work


def test_bad_sampler_arguments():
  with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
    smoothing.Sampler(linear_logits, 2, 0.0)
  with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
    smoothing.Sampler(linear_logits, 2, float("nan"))
  with pytest.raises(ValueError, match="num_classes must be >= 2"):
    smoothing.Sampler(linear_logits, 1, 0.5)
  with pytest.raises(ValueError, match=r"chunk_size \(12\) must be divisible .* \(8\)"):
    smoothing.Sampler(linear_logits, 2, 0.5, chunk_size=12, mesh=data_mesh(8))
  with pytest.raises(ValueError, match="axis named 'data'"):
    smoothing.Sampler(linear_logits, 2, 0.5, mesh=Mesh(np.array(jax.devices()[:2]), ("batch",)))
  params, x = linear_problem(0.9, 0.5)
  sampler = smoothing.Sampler(linear_logits, 2, 0.5, chunk_size=64)
  with pytest.raises(ValueError, match=r"pixel space \[0, 1\]"):
    smoothing.certify(sampler, params, 2 * x - 1, 0, 10, 10, 0.01)
  with pytest.raises(ValueError, match=r"logits_fn must return logits \[64, 3\]"):
    smoothing.Sampler(linear_logits, 3, 0.5, chunk_size=64).sample_counts(params, x[None], [0], 1, 64)


def noisy_via_clean_and_noise(logits_fn, sigma):
  """A "clean_and_noise" logits_fn that forms the "noisy" mode's input itself."""
  return lambda params, x, eps: logits_fn(params, (x + sigma * eps - 0.5) / 0.5)


def test_clean_and_noise_counts_equal_noisy_for_any_devices_and_chunks():
  params, images = mlp_problem()
  indices, n, sigma = np.array([3, 7]), 1000, 0.5
  reference = smoothing.Sampler(mlp_logits, 5, sigma, chunk_size=64).sample_counts(
      params, images, indices, smoothing.ESTIMATION_STREAM, n)
  assert np.sum(reference[0] > 50) >= 2   # spread over classes: a different draw would show
  wrapped = noisy_via_clean_and_noise(mlp_logits, sigma)
  for mesh, chunk in [(None, 64), (None, 100), (data_mesh(1), 64), (data_mesh(8), 64),
                      (data_mesh(8), 48)]:
    sampler = smoothing.Sampler(wrapped, 5, sigma, chunk_size=chunk, mesh=mesh,
                                logits_input="clean_and_noise")
    counts = sampler.sample_counts(params, images, indices, smoothing.ESTIMATION_STREAM, n)
    np.testing.assert_array_equal(counts, reference)
    single = sampler.sample_counts(params, images[1:], indices[1:], smoothing.ESTIMATION_STREAM, n)
    np.testing.assert_array_equal(single[0], reference[1])


def test_clean_and_noise_certify_uses_the_nominal_sigma():
  """The same decision and radius (nominal sigma) as the "noisy" mode on the same draws."""
  params, images = mlp_problem()
  sigma = 0.25
  noisy = smoothing.Sampler(mlp_logits, 5, sigma, chunk_size=128)
  clean = smoothing.Sampler(noisy_via_clean_and_noise(mlp_logits, sigma), 5, sigma,
                            chunk_size=256, logits_input="clean_and_noise")
  expected = smoothing.certify(noisy, params, images[0], 5, 100, 2000, 0.001)
  assert expected[0] != smoothing.ABSTAIN
  assert smoothing.certify(clean, params, images[0], 5, 100, 2000, 0.001) == expected
  assert smoothing.predict(clean, params, images[1], 6, 500, 0.001) == smoothing.predict(
      noisy, params, images[1], 6, 500, 0.001)


def test_clean_and_noise_inputs_are_the_noisy_inputs_draws():
  params, images = mlp_problem()
  sigma = 0.5
  sampler = smoothing.Sampler(mlp_logits, 5, sigma, chunk_size=64, mesh=data_mesh(8),
                              logits_input="clean_and_noise")
  x, eps = sampler.clean_and_noise(images, [3, 7], smoothing.SELECTION_STREAM, 100, 64)
  assert x.shape == eps.shape == (128, 6, 6, 3)
  assert x.sharding.spec == eps.sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(x).reshape(64, 2, 6, 6, 3),
                                np.broadcast_to(images, (64, 2, 6, 6, 3)))
  assert abs(np.asarray(eps).std() - 1.0) < 0.03   # unit normal, not scaled by sigma
  x_model = sampler.noisy_inputs(images, [3, 7], smoothing.SELECTION_STREAM, 100, 64)
  np.testing.assert_allclose(np.asarray(x_model), (np.asarray(x) + sigma * np.asarray(eps) - 0.5) / 0.5,
                             atol=1e-6)


def test_unknown_logits_input():
  with pytest.raises(ValueError, match=r"logits_input must be one of \('noisy', 'clean_and_noise'\)"):
    smoothing.Sampler(linear_logits, 2, 0.5, logits_input="denoised")


def test_noise_is_the_documented_stream():
  """Sample j of image i in stream s: normal(fold_in(fold_in(fold_in(key, i), s), j))."""
  _, images = mlp_problem()
  sigma, start, chunk = 0.5, 40, 8
  sampler = smoothing.Sampler(mlp_logits, 5, sigma, chunk_size=chunk, seed=3)
  x_model = np.asarray(sampler.noisy_inputs(images, [3, 7], smoothing.SELECTION_STREAM, start, chunk))
  key = jax.random.key(3)
  for j in (0, chunk - 1):
    for row, index in enumerate((3, 7)):
      k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, index),
                                                smoothing.SELECTION_STREAM), start + j)
      eps = np.asarray(jax.random.normal(k, images.shape[1:], jnp.float32))
      expected = (images[row] + np.float32(sigma) * eps - 0.5) / 0.5
      np.testing.assert_allclose(x_model[j * 2 + row], expected, rtol=0, atol=1e-6)
