"""The denoiser parametrization against the check values of docs/method.md."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from rrcm_jax import denoiser


def test_karras_grid_check_values():
  sigmas = np.asarray(denoiser.karras_sigmas(81))
  assert sigmas[0] == pytest.approx(80.0, rel=1e-6)
  assert sigmas[-1] == pytest.approx(0.002, rel=1e-5)
  assert sigmas[1] == pytest.approx(74.6976, rel=1e-5)
  assert sigmas[79] == pytest.approx(0.0027090, rel=1e-4)
  assert np.all(np.diff(sigmas) < 0)


def test_karras_sigma_traced_num_scales_matches_static_grid():
  for n in (21, 41, 81):
    dynamic = [float(denoiser.karras_sigma(i, jnp.int32(n))) for i in (0, 7, n - 1)]
    static = np.asarray(denoiser.karras_sigmas(n))[[0, 7, n - 1]]
    np.testing.assert_allclose(dynamic, static, rtol=1e-6)


@pytest.mark.parametrize("s,index,value", [(0.5, 53, 0.492707), (1.0, 48, 0.965417),
                                           (2.0, 42, 2.003647)])
def test_nearest_grid_index_check_values(s, index, value):
  j = denoiser.nearest_grid_index(s, 81)
  assert j == index
  assert float(denoiser.karras_sigmas(81)[j]) == pytest.approx(value, rel=1e-5)


def test_nearest_grid_index_zero_is_last_point_and_negative_rejected():
  assert denoiser.nearest_grid_index(0.0, 81) == 80
  with pytest.raises(ValueError, match="noise level"):
    denoiser.nearest_grid_index(-0.1, 81)


def test_c_in_and_time_condition():
  assert float(denoiser.c_in(0.0)) == pytest.approx(2.0)
  assert float(denoiser.c_in(80.0)) == pytest.approx(1 / math.sqrt(6400.25), rel=1e-6)
  assert float(denoiser.time_condition(1.0)) == pytest.approx(0.0, abs=1e-6)
  assert float(denoiser.time_condition(0.5)) == pytest.approx(250 * math.log(0.5), rel=1e-6)
  assert float(denoiser.time_condition(80.0)) == pytest.approx(250 * math.log(80.0), rel=1e-6)


def test_pixel_and_noise_spaces():
  u8 = jnp.array([0, 255, 128], jnp.uint8)
  np.testing.assert_allclose(denoiser.pixels_to_model(u8), [-1, 1, 128 / 127.5 - 1], atol=1e-6)
  np.testing.assert_allclose(denoiser.pixels_to_model(jnp.array([0.0, 0.5, 1.0])), [-1, 0, 1])
  assert denoiser.model_noise_level(0.25) == 0.5
