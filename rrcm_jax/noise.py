"""Unit normal draws of many keys at once, bit for bit `jax.random.normal`.

`normal(keys, shape)` equals `jax.random.normal(k, shape)` (float32) for
every key k of `keys`, stacked: the certification sampler's noise keeps the
stream that `jax.random.normal` defines (docs/method.md, Certification; the
sampler's per-sample keys), only computed faster on a CPU.

Why: XLA:CPU lowers JAX's Threefry-2x32 hash as a rolled loop of five
iterations over the whole output array, and the Gaussian draws of one chunk
of noisy samples then cost up to a tenth of the Fashion-MNIST classifier's
forward. Here the 20 rounds are written out (the same
arithmetic as JAX's unrolled lowering, which other backends use), in a scan
over the leading axis of `keys` so that XLA:CPU keeps the integer hash and
the inverse error function in separate loops (fused into one loop, neither
vectorizes and the draw is slower than JAX's own). Other backends get the
fully fused form. Keys of another PRNG implementation, or with
`jax_threefry_partitionable` off, go through `jax.random.normal` itself.
"""
import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
_ONE_BITS = np.array(1.0, np.float32).view(np.uint32)
# jax.random.normal draws u uniform in [nextafter(-1, 0), 1) and returns sqrt(2) erfinv(u).
_LOW = np.nextafter(np.float32(-1.0), np.float32(0.0))


def _rotate_left(x, d):
  return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k1, k2, x1, x2):
  """Threefry-2x32 (20 rounds) of counters (x1, x2) under keys (k1, k2); uint32, broadcast."""
  ks = (k1, k2, k1 ^ k2 ^ _PARITY)
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ _rotate_left(x2, r)
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _uniform(key_data, shape):
  """u in [nextafter(-1, 0), 1), float32 [*key_data.shape[:-1], *shape], as jax.random.uniform."""
  expand = key_data.shape[:-1] + (1,) * len(shape)
  k1, k2 = key_data[..., 0].reshape(expand), key_data[..., 1].reshape(expand)
  # The partitionable stream counts the flat position as a 64-bit integer (high word 0 here).
  low = jnp.arange(int(np.prod(shape)), dtype=jnp.uint32).reshape(shape)
  b1, b2 = threefry2x32(k1, k2, jnp.zeros_like(low), low)
  mantissa = ((b1 ^ b2) >> np.uint32(9)) | _ONE_BITS
  floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
  return jnp.maximum(_LOW, floats * (np.float32(1.0) - _LOW) + _LOW)


def _scanned_uniform(key_data, shape):
  """`_uniform` one leading index at a time: a loop boundary before the erf_inv."""
  return jax.lax.map(lambda k: _uniform(k, shape), key_data)


def _supported(keys):
  return (jax.config.jax_threefry_partitionable
          and str(jax.random.key_impl(keys)) == "threefry2x32")


def normal(keys, shape):
  """Standard normal float32 [*keys.shape, *shape]: `jax.random.normal(k, shape)` per key k.

  Args:
    keys: typed PRNG keys (`jax.random.key`), any batch shape with at least one axis.
    shape: the shape of each key's draw, e.g. (H, W, C).
  """
  shape = tuple(shape)
  if keys.ndim == 0 or not _supported(keys):
    draw = lambda k: jax.random.normal(k, shape, jnp.float32)
    for _ in range(keys.ndim):
      draw = jax.vmap(draw)
    return draw(keys)
  data = jax.random.key_data(keys)
  u = jax.lax.platform_dependent(data, cpu=lambda d: _scanned_uniform(d, shape),
                                 default=lambda d: _uniform(d, shape))
  return np.float32(np.sqrt(2)) * jax.lax.erf_inv(u)
