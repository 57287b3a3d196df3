"""Tests of rrcm_jax/noise.py: the sampler's normal draws are jax.random.normal's, bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrcm_jax import noise


def reference(keys, shape):
  draw = lambda k: jax.random.normal(k, shape, jnp.float32)
  for _ in range(keys.ndim):
    draw = jax.vmap(draw)
  return np.asarray(draw(keys))


@pytest.mark.parametrize("shape", [(4, 4, 1), (28, 28, 1), (5, 3, 3), (7,)])
def test_normal_is_jax_random_normal_bit_for_bit(shape):
  base = jax.random.key(11)
  keys = jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(6)).reshape(3, 2)
  assert noise._supported(keys)   # pylint: disable=protected-access  (the unrolled path, not the fallback)
  draws = np.asarray(jax.jit(lambda k: noise.normal(k, shape))(keys))
  assert draws.shape == (3, 2) + shape
  np.testing.assert_array_equal(draws.view(np.uint32), reference(keys, shape).view(np.uint32))
  assert abs(draws.std() - 1.0) < 0.25 and len(np.unique(draws)) > 0.99 * draws.size


def test_both_lowerings_agree():
  """The CPU form (a scan over the leading axis) and the fused form other backends get."""
  keys = jax.random.split(jax.random.key(5), 4)
  data = jax.random.key_data(keys)
  scanned = jax.jit(lambda d: noise._scanned_uniform(d, (6, 6, 3)))(data)   # pylint: disable=protected-access
  fused = jax.jit(lambda d: noise._uniform(d, (6, 6, 3)))(data)   # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(scanned), np.asarray(fused))
  assert float(jnp.min(fused)) > -1.0 and float(jnp.max(fused)) < 1.0


def test_other_prng_implementations_fall_back():
  keys = jax.random.split(jax.random.key(2, impl="rbg"), 3)
  assert not noise._supported(keys)   # pylint: disable=protected-access
  draws = noise.normal(keys, (4, 4))
  np.testing.assert_array_equal(np.asarray(draws), reference(keys, (4, 4)))
