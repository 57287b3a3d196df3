"""Diffusion noise schedules and the DDS timestep, as pure float64 numpy functions.

Index t = 0 … T−1 as in improved-/guided-diffusion: ᾱ_t = ∏_{s≤t} (1 − β_s),
and a sample at step t is x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε with x_0 in model
space [−1, 1]. Its noise relative to the signal, √(1−ᾱ_t)/√ᾱ_t, is in model
space, so it matches a pixel-space smoothing σ at 2σ (docs/method.md,
"Diffusion denoised smoothing").
"""
import math

import numpy as np

NOISE_SCHEDULES = ("linear", "cosine")


def betas(noise_schedule, num_steps):
  """β_t, float64 [num_steps].

  "linear": linspace(1e-4, 0.02) scaled by 1000 / num_steps (Ho et al.);
  "cosine": β_t = min(1 − f((t+1)/T) / f(t/T), 0.999), f(u) = cos²((u + 0.008)/1.008 · π/2)
  (Nichol & Dhariwal).
  """
  if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
  num_steps = int(num_steps)
  if noise_schedule == "linear":
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
  if noise_schedule == "cosine":
    def f(u):
      return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    # Python floats as the reference computes them, so t* thresholds tie-break identically.
    return np.array([min(1 - f((t + 1) / num_steps) / f(t / num_steps), 0.999)
                     for t in range(num_steps)], np.float64)
  raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {noise_schedule!r}.")


def alphas_cumprod(noise_schedule, num_steps):
  """ᾱ_t = ∏_{s≤t} (1 − β_s), float64 [num_steps]."""
  return np.cumprod(1.0 - betas(noise_schedule, num_steps), axis=0)


def noise_to_signal(alpha_bar):
  """√(1−ᾱ_t)/√ᾱ_t (model space), float64: the two roots taken first, then divided."""
  alpha_bar = np.asarray(alpha_bar, np.float64)
  return np.sqrt(1.0 - alpha_bar) / np.sqrt(alpha_bar)


def dds_timestep(sigma, alpha_bar):
  """t*: the first t >= 1 with √(1−ᾱ_t)/√ᾱ_t >= 2σ (rounded up, never the nearest).

  Args:
    sigma: smoothing noise std in pixel space [0, 1], > 0.
    alpha_bar: ᾱ_t, float64 [T].

  Returns:
    int t* in 1 … T−1; the noise it actually adds is noise_to_signal(ᾱ_t*) / 2 >= σ
    in pixel space.
  """
  if not (isinstance(sigma, (int, float, np.floating)) and math.isfinite(sigma) and sigma > 0):
    raise ValueError(f"sigma must be a finite number > 0 (pixel space [0, 1]), got {sigma!r}.")
  ratio = noise_to_signal(alpha_bar)
  reached = np.nonzero(ratio[1:] >= 2.0 * float(sigma))[0]
  if reached.size == 0:
    raise ValueError(f"sigma {sigma} (model-space {2 * sigma}) exceeds the schedule's largest "
                     f"noise-to-signal ratio {ratio[-1]:.6g}; pick a smaller sigma.")
  return int(reached[0]) + 1


def dds_sigma_added(sigma, alpha_bar):
  """The pixel-space noise std DDS actually adds for σ: noise_to_signal(ᾱ_t*) / 2 >= σ."""
  return float(noise_to_signal(alpha_bar[dds_timestep(sigma, alpha_bar)]) / 2)


def model_timesteps(t, num_steps, rescale_timesteps):
  """What the U-Net receives for integer steps t: float32 t · 1000 / T when the network was
  trained with rescale_timesteps (improved-diffusion's CIFAR-10 models), else t as float32."""
  t = np.asarray(t)
  if rescale_timesteps:
    return t.astype(np.float32) * np.float32(1000.0 / num_steps)
  return t.astype(np.float32)
