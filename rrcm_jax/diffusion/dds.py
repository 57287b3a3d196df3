"""The DDS base classifier (Carlini et al., ICLR 2023): noise, one-shot denoise, classify.

docs/method.md, "Diffusion denoised smoothing". For a smoothing σ in pixel
space, DDS picks t* (`schedules.dds_timestep`: the first step whose model-space
noise-to-signal ratio reaches 2σ) and, per noisy sample of a clean image x in
pixel space [0, 1] with a unit normal ε (model space):

  x_in = 2x − 1;  x_t = √ᾱ·x_in + √(1−ᾱ)·ε;  ε̂ = U-Net(x_t, t*)[..., :C];
  x̂0 = clip(√(1/ᾱ)·x_t − √(1/ᾱ − 1)·ε̂, −1, 1);  logits = classifier(resize(x̂0)).

x_t is √ᾱ times the model-space input 2(x + σ'ε) − 1 with σ' =
`schedules.dds_sigma_added(σ)` >= σ; the certificate uses the nominal σ, as
the authors' code does. The coefficients are float64, cast to float32, and the
arithmetic is float32, as in the reference. The classifier receives x̂0 in
model space [−1, 1] resized (bicubic, antialiased: torch's antialiased kernel
a = −0.5) to its resolution; no clipping after the resize (bicubic overshoots).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rrcm_jax.diffusion import schedules
from rrcm_jax.diffusion.unet import UNET_PRESETS, UNet

# DDS denoisers: U-Net preset, schedule, timestep convention, native resolution.
DDS_PRESETS = {
    "cifar10_uncond_50M_500K": dict(noise_schedule="cosine", num_steps=4000,
                                    rescale_timesteps=True, image_size=32),
    "256x256_diffusion_uncond": dict(noise_schedule="linear", num_steps=1000,
                                     rescale_timesteps=False, image_size=256),
    # The demo-size denoiser of UNET_PRESETS (no published weights): cosine, 1000 steps.
    "fashion_mnist_small": dict(noise_schedule="cosine", num_steps=1000,
                                rescale_timesteps=False, image_size=28),
    "fashion_mnist_tiny": dict(noise_schedule="cosine", num_steps=1000,
                               rescale_timesteps=False, image_size=28),
}


@dataclasses.dataclass(frozen=True)
class DDSStep:
  """The diffusion step DDS denoises from, for one smoothing σ (pixel space).

  t: t*; t_in: what the U-Net receives (float32); the coefficients are float32
  casts of the float64 schedule at t*.
  """
  sigma: float
  t: int
  t_in: float
  sqrt_alpha_bar: np.float32
  sqrt_one_minus_alpha_bar: np.float32
  sqrt_recip_alpha_bar: np.float32
  sqrt_recipm1_alpha_bar: np.float32
  sigma_added: float   # pixel-space noise std actually added, >= sigma


def dds_step(sigma, noise_schedule, num_steps, rescale_timesteps):
  """`DDSStep` for σ (pixel space) on a schedule; ValueError when it never reaches 2σ."""
  alpha_bar = schedules.alphas_cumprod(noise_schedule, num_steps)
  t = schedules.dds_timestep(sigma, alpha_bar)
  a = alpha_bar[t]
  return DDSStep(
      sigma=float(sigma), t=t,
      t_in=float(schedules.model_timesteps(t, num_steps, rescale_timesteps)),
      sqrt_alpha_bar=np.float32(np.sqrt(a)),
      sqrt_one_minus_alpha_bar=np.float32(np.sqrt(1.0 - a)),
      sqrt_recip_alpha_bar=np.float32(np.sqrt(1.0 / a)),
      sqrt_recipm1_alpha_bar=np.float32(np.sqrt(1.0 / a - 1)),
      sigma_added=float(schedules.noise_to_signal(a) / 2))


def noisy_x_t(x, noise, step):
  """x_t = √ᾱ·(2x − 1) + √(1−ᾱ)·ε, float32, from clean x [..., H, W, C] in pixel space [0, 1]
  and ε of the same shape (unit normal, model space): DDS's `q_sample` on the same ε."""
  x_in = jnp.asarray(x, jnp.float32) * 2 - 1
  return step.sqrt_alpha_bar * x_in + step.sqrt_one_minus_alpha_bar * jnp.asarray(noise, jnp.float32)


def x_t_from_model_input(x_model, step):
  """x_t = √ᾱ·x_model for a model-space input x_model = 2(x + σ'ε) − 1 drawn at
    σ' = step.sigma_added (pixel space); equals `noisy_x_t` up to float32 rounding."""
  return step.sqrt_alpha_bar * jnp.asarray(x_model, jnp.float32)


def predict_x0(x_t, eps, step, clip=True):
  """x̂0 = √(1/ᾱ)·x_t − √(1/ᾱ − 1)·ε̂ in model space, clamped to [−1, 1] when clip."""
  x0 = step.sqrt_recip_alpha_bar * x_t - step.sqrt_recipm1_alpha_bar * eps
  return jnp.clip(x0, -1.0, 1.0) if clip else x0


def denoise(unet, unet_variables, x_t, step, clip=True):
  """One-shot x̂0 [b, H, W, C] (model space) from x_t [b, H, W, C]: one U-Net call at t*.

  With a learned variance (out_channels = 2C) the U-Net's first C channels are ε̂.
  """
  t_in = jnp.full((x_t.shape[0],), step.t_in, jnp.float32)
  out = unet.apply(unet_variables, x_t, t_in)
  return predict_x0(x_t, out[..., :x_t.shape[-1]], step, clip)


def resize_for_classifier(x0, size):
  """x̂0 [b, H, W, C] -> [b, size, size, C], bicubic with antialiasing (no clipping after);
  unchanged when size is None or already H = W = size."""
  if size is None or x0.shape[1:3] == (size, size):
    return x0
  return jax.image.resize(x0, (x0.shape[0], size, size, x0.shape[-1]), "bicubic", antialias=True)


def make_logits_fn(unet, classifier_fn, step, classifier_size=None):
  """The DDS base classifier as a pure function for the smoothing sampler.

  Args:
    unet: a `UNet` (its module; variables come with params).
    classifier_fn: `classifier_fn(classifier_params, x) -> logits [b, K]`, x float32
      [b, S, S, C] in model space [−1, 1] (may overshoot it slightly: bicubic).
    step: `dds_step(σ, ...)` for the smoothing σ.
    classifier_size: S, the classifier's resolution; None keeps the denoiser's.

  Returns:
    `logits_fn(params, x, noise) -> logits [b, K]`, params = {"denoiser": U-Net variables,
    "classifier": classifier params}, x [b, H, W, C] clean images in pixel space [0, 1],
    noise [b, H, W, C] unit normal (the sample's ε).
  """
  def logits_fn(params, x, noise):
    x0 = denoise(unet, params["denoiser"], noisy_x_t(x, noise, step), step)
    return classifier_fn(params["classifier"], resize_for_classifier(x0, classifier_size))
  return logits_fn


def preset_unet_and_step(name, sigma, dtype=jnp.float32):
  """(UNet, DDSStep) of a DDS denoiser (`DDS_PRESETS`) for σ in pixel space."""
  if name not in DDS_PRESETS:
    raise ValueError(f"unknown DDS denoiser {name!r}; known: {sorted(DDS_PRESETS)}.")
  cfg = DDS_PRESETS[name]
  step = dds_step(sigma, cfg["noise_schedule"], cfg["num_steps"], cfg["rescale_timesteps"])
  return UNet(**UNET_PRESETS[name], dtype=dtype), step

