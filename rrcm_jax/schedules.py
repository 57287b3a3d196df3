"""Schedules as pure functions of the optimizer step (docs/method.md).

Each works on Python numbers and on traced jnp scalars alike, so the train
step evaluates them inside `jit` without recompiling when their value
changes (the number of scales goes 21 → 41 → 81). Floating results use the
default float: float32 inside the train step, float64 under
`jax.experimental.enable_x64()` (how the tests compare them with the
reference's float64 values).
"""
import math

import jax.numpy as jnp


def icm_horizon(total_steps, start_scales=20, end_scales=80):
  """K' = ceil(K / log2(ceil(s1/s0) + 1)), the steps per doubling."""
  return math.ceil(total_steps / math.log2(math.ceil(end_scales / start_scales) + 1))


def num_scales(step, total_steps, start_scales=20, end_scales=80):
  """N(k) = min(s0 · 2^ceil(k/K'), s1) + 1 (the reference's ceil: N(0)=21, N(1)=41), int32."""
  horizon = icm_horizon(total_steps, start_scales, end_scales)
  if isinstance(step, int):
    return min(start_scales * 2 ** math.ceil(step / horizon), end_scales) + 1
  # ceil(k/K') in integers: exact at any step (a float32 quotient is not).
  doublings = (jnp.asarray(step, jnp.int32) + horizon - 1) // horizon
  # Clip the exponent first: 2^large overflows long before the min applies.
  doublings = jnp.minimum(doublings, math.ceil(math.log2(end_scales / start_scales)) + 1)
  n = jnp.minimum(start_scales * 2 ** doublings, end_scales) + 1
  return n.astype(jnp.int32)


def _float(x):
  """x as the default float: float32, or float64 under `jax.experimental.enable_x64`."""
  return jnp.asarray(x, jnp.result_type(float))


def target_ema(step, decay_steps, start=0.99, end=0.9999, A=15.0):
  """The "sigmoid" target-network EMA rate μ(k) (docs/method.md; never quite reaches `end`).

  e − μ0 is computed as frac·(μ1² − μ0²)/(e + μ0): the direct difference of two
  numbers near 1 loses most float32 digits, which A/(μ1 − μ0) then amplifies.
  """
  frac = jnp.minimum(_float(step) / decay_steps, 1.0)
  e = jnp.sqrt(frac * (end ** 2 - start ** 2) + start ** 2)
  e_minus_start = frac * (end ** 2 - start ** 2) / (e + start)
  c = 2.0 / (1.0 + jnp.exp(-A * e_minus_start / (end - start))) - 1.0
  return c * end + (1.0 - c) * start


def learning_rate(step, base_lr, warmup_steps, total_steps):
  """`base_lr` · f(k): linear warm-up f = k/W for k ≤ W, then ½(1 + cos(π(k − W)/(T − W))).

  f(0) = 0: the first update runs with learning rate 0 (Adam's moments still
  move), as the reference's LambdaLR. f = 0 from k = T on. Without warm-up
  (W = 0) the cosine starts at f(0) = 1 (the reference keeps f = 1 throughout). The cosine part is
  evaluated as sin²(π/2 · (T − k)/(T − W)), the same number without the
  cancellation of 1 + cos near the end (in float32 that costs 1e-6 relative
  already 1/8 of the way before T).
  """
  step = _float(step)
  warm = jnp.minimum(step / max(warmup_steps, 1), 1.0)
  remaining = jnp.clip((total_steps - step) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
  cosine = jnp.square(jnp.sin(0.5 * math.pi * remaining))
  return base_lr * jnp.where(step < warmup_steps, warm, cosine)   # both 1 at k = W


def clip_scale(grad_norm, step, warmup_steps, max_norm):
  """Factor applied to the gradient: min(1, max_norm / (‖g‖ + 1e-6)) from step `warmup_steps` on.

  The formula is torch's `clip_grad_norm_` (the reference clips with it); during
  warm-up the factor is 1. The switch is a function of the step alone, so a
  resumed run clips exactly as an uninterrupted one (the reference's flag is
  only set when its counter passes the end of warm-up, so its resumed runs
  never clip again).
  """
  if max_norm is None or max_norm <= 0:   # the reference's "gradclip 0": never clip
    return jnp.ones_like(jnp.asarray(grad_norm))
  clipped = jnp.minimum(1.0, max_norm / (grad_norm + 1e-6))
  return jnp.where(jnp.asarray(step) >= warmup_steps, clipped, 1.0)
