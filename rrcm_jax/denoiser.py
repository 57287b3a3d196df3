"""The denoiser parametrization: the Karras noise grid, c_in, the time condition.

Every stage calls the encoder *at a noise level* through `encode_at_sigma`:
pre-training at σ_i, fine-tuning at the grid point nearest the noise it adds,
certification at the grid point nearest 2σ. Nothing else recomputes `c_in`,
`τ` or the grid.

Spaces: pixels live in [0, 1] (or uint8 [0, 255]); the model sees
`(v − 0.5) / 0.5` in [-1, 1] ("model space"). Every σ in this module is a
*model-space* noise standard deviation; a certification σ in pixel space is
2σ here (see `model_noise_level`).
"""
import jax.numpy as jnp
import numpy as np

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
SIGMA_DATA = 0.5


def pixels_to_model(x):
  """Pixel space -> model space [-1, 1], float32.

  Args:
    x: uint8 images in [0, 255] or floating images in [0, 1], any shape.
  """
  if jnp.issubdtype(x.dtype, jnp.integer):   # as torchvision's ToTensor, then Normalize
    x = x.astype(jnp.float32) / 255.0
  return (x.astype(jnp.float32) - 0.5) / 0.5


def model_noise_level(sigma_pixel):
  """A pixel-space noise std σ (certification) -> its model-space std 2σ."""
  return 2.0 * sigma_pixel


def karras_sigma(i, num_scales, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
  """σ_i of the N-point Karras grid (σ_0 = σ_max, σ_{N-1} = σ_min).

  `i` and `num_scales` may be traced scalars (the number of scales changes
  during pre-training without recompiling).
  """
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  frac = jnp.asarray(i, jnp.float32) / (jnp.asarray(num_scales, jnp.float32) - 1.0)
  return (hi + frac * (lo - hi)) ** rho


def karras_sigmas(num_scales, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
  """The whole grid, shape [num_scales], decreasing; `num_scales` is static."""
  return karras_sigma(jnp.arange(num_scales), num_scales, sigma_min, sigma_max, rho)


def nearest_grid_index(s, num_scales, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
  """argmin_j |σ_j − s| on the N-point grid for a model-space level s ≥ 0.

  s = 0 maps to the last (cleanest) grid point N − 1. `s` and `num_scales`
  are Python numbers: the result is a configuration constant, not a traced
  value.
  """
  if s < 0:
    raise ValueError(f"noise level must be >= 0, got {s}.")
  if s == 0:
    return num_scales - 1
  grid = np.asarray(karras_sigmas(num_scales, sigma_min, sigma_max, rho), np.float64)
  return int(np.argmin(np.abs(grid - s)))


def c_in(sigma, sigma_data=SIGMA_DATA):
  """Input scaling 1 / sqrt(σ² + σ_data²)."""
  return 1.0 / jnp.sqrt(jnp.square(sigma) + sigma_data ** 2)


def time_condition(sigma):
  """The time value the encoder is conditioned on: τ(σ) = 1000 · 0.25 · ln(σ + 1e-44)."""
  return 1000.0 * 0.25 * jnp.log(jnp.asarray(sigma, jnp.float32) + 1e-44)


def encode_at_sigma(apply_fn, variables, x_noisy, sigma, sigma_data=SIGMA_DATA, **kwargs):
  """Calls a Flax module at noise level σ: `apply_fn(variables, c_in(σ)·x, τ(σ))`.

  Args:
    apply_fn: a module's `apply` (RCMEncoder or Classifier).
    variables: its variables ({"params": ..., "batch_stats": ...}).
    x_noisy: model-space noisy images x + σε, [B, H, W, C].
    sigma: model-space noise std, a scalar or shape [B].
    **kwargs: passed to `apply_fn` (train=..., mutable=...).
  """
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x_noisy.shape[:1])
  scale = c_in(sigma, sigma_data)[:, None, None, None]
  return apply_fn(variables, scale * x_noisy, time_condition(sigma), **kwargs)
