"""Training the DDS denoiser: ε-prediction DDPM (Ho et al. 2020), its state, step and checks.

docs/method.md, "Diffusion denoised smoothing". Per image x (model space
[−1, 1]) the step draws t uniform in {0, …, T−1} and a unit normal ε, forms
x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε and regresses the U-Net's output on ε (mean squared
error over every pixel and channel). ᾱ comes from `diffusion.schedules`
(float64, cast to float32 once); the U-Net receives t as
`schedules.model_timesteps` gives it, so the weights serve `dds.denoise`
unchanged. AdamW with a warm-up then a constant or cosine learning rate
(`learning_rate`, a pure function of the step), global-norm clipping, and an
EMA of the weights (`ema_params`, rate `config.ema_rate`) that denoising uses,
debiased for its initialization's share (`debiased_ema`).

FLOPs (`rrcm_jax.flops` convention: a forward 1, forward + backward 3):
`unet_forward_flops` counts the convolutions' and matmuls' multiply-adds ×2
of one forward of one image from the jaxpr; a step costs 3 × that × batch.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rrcm_jax import denoiser, parallel, train_state
from rrcm_jax.diffusion import schedules
from rrcm_jax.diffusion.unet import UNet

LR_DECAYS = ("constant", "cosine")


def build_unet(unet_cfg):
  """The `UNet` of a config's `unet` section (the U-Net's constructor arguments)."""
  kwargs = dict(unet_cfg)
  for name in ("attention_resolutions", "channel_mult"):
    kwargs[name] = tuple(kwargs[name])
  return UNet(**kwargs)


def validate_config(config, mesh):
  """Raises ValueError with one sentence naming the bad key and what is allowed."""
  d, u = config.diffusion, config.unet
  if d.noise_schedule not in schedules.NOISE_SCHEDULES:
    raise ValueError(f"config.diffusion.noise_schedule must be one of "
                     f"{schedules.NOISE_SCHEDULES}, got {d.noise_schedule!r}.")
  if not (isinstance(d.num_steps, int) and d.num_steps >= 2):
    raise ValueError(f"config.diffusion.num_steps={d.num_steps!r} must be an integer >= 2.")
  if u.in_channels != config.data.channels or u.out_channels not in (u.in_channels,
                                                                      2 * u.in_channels):
    raise ValueError(f"config.unet.in_channels={u.in_channels} must equal config.data.channels="
                     f"{config.data.channels}, and out_channels={u.out_channels} must be it "
                     "(ε) or twice it (ε and a variance).")
  depth = 2 ** (len(u.channel_mult) - 1)
  if config.data.image_size % depth:
    raise ValueError(f"config.data.image_size={config.data.image_size} must be a multiple of "
                     f"{depth} (one halving per level of config.unet.channel_mult after the first).")
  if config.total_steps < 1 or not 0 <= config.optim.warmup_steps <= config.total_steps:
    raise ValueError(f"config.total_steps={config.total_steps} must be >= 1 and "
                     f"config.optim.warmup_steps={config.optim.warmup_steps} in [0, total_steps].")
  if config.optim.decay not in LR_DECAYS:
    raise ValueError(f"config.optim.decay must be one of {LR_DECAYS}, got {config.optim.decay!r}.")
  if not 0 <= config.ema_rate < 1:
    raise ValueError(f"config.ema_rate={config.ema_rate} must be in [0, 1).")
  parallel.check_batch_size(config.batch_size, mesh)


def learning_rate(step, base_lr, warmup_steps, total_steps, decay="constant"):
  """Linear warm-up from 0 over `warmup_steps`, then constant or cosine to 0 at `total_steps`.

  Pure; `step` may be traced (int32) or a Python int. Step 0 has lr 0 when warming up.
  """
  step = jnp.asarray(step, jnp.float32)
  warm = base_lr * step / max(warmup_steps, 1)
  if decay == "constant":
    after = jnp.asarray(base_lr, jnp.float32)
  else:
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    after = base_lr * 0.5 * (1 + jnp.cos(math.pi * jnp.clip(progress, 0.0, 1.0)))
  return jnp.where(step < warmup_steps, warm, after)


def optimizer(config):
  """(optax AdamW with global-norm clipping, lr_fn(step)) of `config.optim`."""
  o = config.optim
  lr_fn = functools.partial(learning_rate, base_lr=o.lr, warmup_steps=o.warmup_steps,
                            total_steps=config.total_steps, decay=o.decay)
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                   optax.adamw(lr_fn, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
  return tx, lr_fn


def initial_params(unet, image_size, seed):
  """θ0: the U-Net's initial parameters of a run with `seed` (what `create_state` starts from)."""
  x = jnp.zeros((1, image_size, image_size, unet.in_channels), jnp.float32)
  return unet.init(jax.random.key(seed), x, jnp.zeros((1,), jnp.float32))["params"]


def debiased_ema(ema, init, rate, steps):
  """(ema − rate^steps·θ0) / (1 − rate^steps): the EMA without its initialization's share
  (an EMA started at θ0 weights it rate^steps); the EMA itself when steps is 0."""
  share = rate ** steps
  if steps == 0 or share == 0:
    return ema
  return jax.tree.map(lambda e, p: (e - share * p) / (1 - share), ema, init)


def create_state(config, unet, tx, mesh):
  """A fresh state (params, AdamW state, EMA copy equal to params), replicated; (state, shardings)."""
  def init():
    params = initial_params(unet, config.data.image_size, config.seed)
    return train_state.TrainState.create(params, tx, with_ema=True)

  shardings = parallel.state_shardings(jax.eval_shape(init), mesh)
  return jax.jit(init, out_shardings=shardings)(), shardings


def diffusion_loss(params, x0, t, noise, dropout_key, *, unet, sqrt_alpha_bar,
                   sqrt_one_minus_alpha_bar, t_scale):
  """Mean squared error of the U-Net's ε̂(x_t, t) against ε (model space).

  x0, noise: float32 [B, H, W, C]; t: int32 [B]; the two coefficient tables
  float32 [T]; t_scale: what the U-Net's timestep input is per integer step.
  """
  shape = (-1,) + (1,) * (x0.ndim - 1)
  x_t = (sqrt_alpha_bar[t].reshape(shape) * x0
         + sqrt_one_minus_alpha_bar[t].reshape(shape) * noise)
  out = unet.apply({"params": params}, x_t, t.astype(jnp.float32) * t_scale, train=True,
                   rngs={"dropout": dropout_key})
  return jnp.mean(jnp.square(out[..., :x0.shape[-1]] - noise))


def make_train_step(config, unet, tx, lr_fn, mesh, shardings):
  """The jitted step: (state, batch {"image": uint8 [B, H, W, C], ...}, key) -> (state, metrics).

  key = fold_in(key, step) gives t, ε and dropout; nothing depends on the
  device count. Metrics: loss, grad_norm (before clipping), param_norm, lr.
  """
  d = config.diffusion
  alpha_bar = schedules.alphas_cumprod(d.noise_schedule, d.num_steps)
  t_scale = float(schedules.model_timesteps(1, d.num_steps, d.rescale_timesteps))
  loss_fn = functools.partial(
      diffusion_loss, unet=unet, t_scale=t_scale,
      sqrt_alpha_bar=jnp.asarray(np.sqrt(alpha_bar), jnp.float32),
      sqrt_one_minus_alpha_bar=jnp.asarray(np.sqrt(1.0 - alpha_bar), jnp.float32))
  batch_sharding = parallel.data_sharding(mesh)
  rate = config.ema_rate

  def step_fn(state, batch, key):
    key_t, key_noise, key_dropout = jax.random.split(jax.random.fold_in(key, state.step), 3)
    x0 = denoiser.pixels_to_model(batch["image"])
    t = jax.random.randint(key_t, x0.shape[:1], 0, d.num_steps)
    noise = jax.lax.with_sharding_constraint(jax.random.normal(key_noise, x0.shape, jnp.float32),
                                             batch_sharding)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x0, t, noise, key_dropout)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda a, p: rate * a + (1 - rate) * p, state.ema_params, params)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params), lr=lr_fn(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), metrics

  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding, parallel.replicated(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)


def unet_forward_flops(unet, image_size):
  """FLOPs (2 per multiply-add) of one forward of one image: convolutions and matmuls of the
  jaxpr (GroupNorm, activations and the other elementwise work left out, as `flops.py`)."""
  x = jnp.zeros((1, image_size, image_size, unet.in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  variables = jax.eval_shape(unet.init, jax.random.key(0), x, t)
  return matmul_flops(lambda v: unet.apply(v, x, t), variables)


def matmul_flops(fn, *args):
  """FLOPs (2 per multiply-add) of the convolutions and matmuls in the jaxpr of fn(*args);
  args may be arrays or jax.ShapeDtypeStruct trees (nothing is computed)."""
  return float(_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr))


def _matmul_flops(jaxpr):
  total = 0
  for eqn in jaxpr.eqns:
    for sub in _subjaxprs(eqn):   # pjit, remat, custom_vjp, scan bodies (a scan's `length` times)
      total += _matmul_flops(sub) * eqn.params.get("length", 1)
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2 * int(np.prod(out)) * int(np.prod([lhs[i] for i in contract]))
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      dn = eqn.params["dimension_numbers"]
      kernel_in = int(np.prod(rhs)) // rhs[dn.rhs_spec[0]]   # in-channels × kernel area
      total += 2 * int(np.prod(out)) * kernel_in // eqn.params["feature_group_count"]
  return total


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else [value]:
      if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr
      elif hasattr(item, "eqns"):
        yield item
