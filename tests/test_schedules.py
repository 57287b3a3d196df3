"""Schedules against the check values of docs/method.md (and hand-computed ones)."""
import math

import jax
import jax.numpy as jnp
import pytest

from rrcm_jax import schedules


def test_icm_horizon_and_num_scales_reference_ceil():
  assert schedules.icm_horizon(300_000) == 129_203
  assert schedules.icm_horizon(600_000) == 258_406
  assert schedules.num_scales(0, 300_000) == 21
  assert schedules.num_scales(1, 300_000) == 41
  assert schedules.num_scales(129_203, 300_000) == 41
  assert schedules.num_scales(129_204, 300_000) == 81
  assert schedules.num_scales(300_000, 300_000) == 81


def test_num_scales_traced_matches_python_without_recompiling():
  traces = []

  @jax.jit
  def f(step):
    traces.append(1)
    return schedules.num_scales(step, 300_000)

  for step in (0, 1, 129_203, 129_204, 299_999):
    assert int(f(jnp.int32(step))) == schedules.num_scales(step, 300_000)
  assert len(traces) == 1


@pytest.mark.parametrize("step,value", [(0, 0.99), (1000, 0.990248681), (10_000, 0.992435933),
                                        (150_000, 0.999889257), (300_000, 0.999899994)])
def test_target_ema_cifar10(step, value):
  assert float(schedules.target_ema(step, 300_000, A=15.0)) == pytest.approx(value, abs=6e-8)


@pytest.mark.parametrize("step,value", [(1000, 0.990082910), (300_000, 0.999769109)])
def test_target_ema_imagenet(step, value):
  assert float(schedules.target_ema(step, 600_000, A=10.0)) == pytest.approx(value, abs=6e-8)


def test_learning_rate_warmup_then_cosine():
  lr = lambda s: float(schedules.learning_rate(s, 1e-3, 100, 1100))
  assert lr(0) == 0.0
  assert lr(50) == pytest.approx(5e-4)
  assert lr(100) == pytest.approx(1e-3)
  assert lr(600) == pytest.approx(0.5e-3, rel=1e-5)    # halfway through the cosine
  assert lr(350) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi / 4)), rel=1e-5)
  assert lr(1100) == pytest.approx(0.0, abs=1e-12)


def test_clipping_only_after_warmup():
  assert float(schedules.clip_scale(10.0, 5, 10, 2.0)) == 1.0
  assert float(schedules.clip_scale(10.0, 10, 10, 2.0)) == pytest.approx(0.2)
  assert float(schedules.clip_scale(1.0, 50, 10, 2.0)) == 1.0


def test_learning_rate_without_warmup_starts_at_the_peak():
  assert float(schedules.learning_rate(0, 1e-3, 0, 100)) == pytest.approx(1e-3)
  assert float(schedules.learning_rate(50, 1e-3, 0, 100)) == pytest.approx(0.5e-3, rel=1e-5)
