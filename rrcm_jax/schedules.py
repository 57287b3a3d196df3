"""Schedules as pure functions of the optimizer step (SPEC).

Each works on Python numbers and on traced jnp scalars alike, so the train
step evaluates them inside `jit` without recompiling when their value
changes (the number of scales goes 21 → 41 → 81).
"""
import math

import jax.numpy as jnp


def icm_horizon(total_steps, start_scales=20, end_scales=80):
  """K' = ceil(K / log2(ceil(s1/s0) + 1)), the steps per doubling."""
  return math.ceil(total_steps / math.log2(math.ceil(end_scales / start_scales) + 1))


def num_scales(step, total_steps, start_scales=20, end_scales=80):
  """N(k) = min(s0 · 2^ceil(k/K'), s1) + 1 (the reference's ceil: N(0)=21, N(1)=41)."""
  horizon = icm_horizon(total_steps, start_scales, end_scales)
  if isinstance(step, int):
    return min(start_scales * 2 ** math.ceil(step / horizon), end_scales) + 1
  doublings = jnp.ceil(jnp.asarray(step, jnp.float32) / horizon)
  # Clip the exponent first: 2^large overflows long before the min applies.
  doublings = jnp.minimum(doublings, math.ceil(math.log2(end_scales / start_scales)) + 1)
  n = jnp.minimum(start_scales * 2.0 ** doublings, end_scales) + 1
  return n.astype(jnp.int32)


def target_ema(step, decay_steps, start=0.99, end=0.9999, A=15.0):
  """The "sigmoid" target-network EMA rate μ(k) (SPEC; never quite reaches `end`).

  e − μ0 is computed as frac·(μ1² − μ0²)/(e + μ0): the direct difference of two
  numbers near 1 loses most float32 digits, which A/(μ1 − μ0) then amplifies.
  """
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / decay_steps, 1.0)
  e = jnp.sqrt(frac * (end ** 2 - start ** 2) + start ** 2)
  e_minus_start = frac * (end ** 2 - start ** 2) / (e + start)
  c = 2.0 / (1.0 + jnp.exp(-A * e_minus_start / (end - start))) - 1.0
  return c * end + (1.0 - c) * start


def learning_rate(step, base_lr, warmup_steps, total_steps):
  """Linear warm-up from 0 to `base_lr`, then cosine to 0 at `total_steps`."""
  step = jnp.asarray(step, jnp.float32)
  warm = base_lr * step / jnp.maximum(warmup_steps, 1)
  progress = jnp.clip((step - warmup_steps) / jnp.maximum(total_steps - warmup_steps, 1), 0, 1)
  cosine = 0.5 * base_lr * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup_steps, warm, cosine)


def clip_scale(grad_norm, step, warmup_steps, max_norm):
  """Factor applied to the gradient: clip to `max_norm` only after warm-up."""
  clipped = jnp.minimum(1.0, max_norm / jnp.maximum(grad_norm, 1e-12))
  return jnp.where(jnp.asarray(step) >= warmup_steps, clipped, 1.0)
