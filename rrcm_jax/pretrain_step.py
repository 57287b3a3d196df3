"""One rRCM pre-training step, its state and the config checks it needs.

Two layers (docs/method.md, "Pre-training objective"):
  `train_update(state, views, noise, index, ...)`: pure; the loss, gradients,
    clipping, the optimizer, the target EMA, the EMA model and the metrics for
    given model-space views, noise and grid index. Replaying recorded inputs
    through it tests the step itself.
  `make_train_step(...)`: the jitted step the loop calls; it draws the grid
    index and ε from the key, turns the uint8 views into model space and calls
    `train_update`.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from rrcm_jax import denoiser, losses, models, optim, parallel, schedules, train_state


def validate_config(config, mesh):
  """Raises ValueError with one sentence naming the bad key and what is allowed."""
  models.validate_model_config(config.model)
  d = config.denoiser
  if not 0 < d.sigma_min < d.sigma_max:
    raise ValueError(f"config.denoiser.sigma_min={d.sigma_min} must be positive and below "
                     f"config.denoiser.sigma_max={d.sigma_max}.")
  if config.data.image_size != config.model.image_size:
    raise ValueError(f"config.data.image_size={config.data.image_size} must equal "
                     f"config.model.image_size={config.model.image_size}.")
  if config.data.channels != config.model.channels:
    raise ValueError(f"config.data.channels={config.data.channels} must equal "
                     f"config.model.channels={config.model.channels}.")
  if config.total_steps < 1:
    raise ValueError(f"config.total_steps={config.total_steps} must be at least 1.")
  if not 0 <= config.optim.warmup_steps <= config.total_steps:
    raise ValueError(f"config.optim.warmup_steps={config.optim.warmup_steps} must be in "
                     f"[0, total_steps={config.total_steps}].")
  scale = config.data.get("pretrain_crop_scale")   # absent: the augmentations' default
  if scale is not None and (len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1):
    raise ValueError(f"config.data.pretrain_crop_scale={scale} must be (min, max) area "
                     "fractions with 0 < min <= max <= 1.")
  if not 1 <= config.scales.start <= config.scales.end:
    raise ValueError(f"config.scales.start={config.scales.start} must be in [1, "
                     f"config.scales.end={config.scales.end}].")
  if not 0 < config.target_ema.start <= config.target_ema.end < 1:
    raise ValueError("config.target_ema.start and .end must satisfy 0 < start <= end < 1, got "
                     f"{config.target_ema.start} and {config.target_ema.end}.")
  parallel.check_batch_size(config.batch_size, mesh)


def initial_variables(config, model):
  """The encoder's initial {"params", "batch_stats"} of a pre-training run: a function of
  config.seed and config.model only (`create_state` starts from these, jitted)."""
  return model.init(jax.random.key(config.seed), *models.sample_inputs(config.model), train=True)


def initial_params(config, mesh):
  """θ₀: the parameters a pre-training run of `config` starts from, bit for bit (the
  state `create_state` builds on `mesh`; the init is jitted there, and eager or
  differently compiled inits differ in the last bit)."""
  model = models.rcm_encoder(config.model)
  state, _ = create_state(config, model, optim.pretrain_optimizer(config), mesh)
  return state.params


def debiased_ema(ema, initial, rate, steps):
  """(θ_ema − r^T·θ₀) / (1 − r^T): the EMA without the weight r^T it still puts on the
  initialization θ₀ after T steps at rate r (as Adam corrects moments started at 0).

  Since θ_ema,T = r^T·θ₀ + (1 − r)·Σ_{t=1..T} r^(T−t)·θ_t, this is the average of
  θ_1..θ_T with weights that sum to 1. Trees of equal structure; T >= 1.
  """
  if steps < 1 or not 0 < rate < 1:
    raise ValueError(f"the debiased EMA needs at least one step and a rate in (0, 1); got "
                     f"{steps} steps at rate {rate}.")
  decay = float(rate) ** int(steps)
  return jax.tree.map(lambda e, p: (e - decay * p) / (1 - decay), ema, initial)


def create_state(config, model, tx, mesh):
  """Initializes the state (online, target and EMA copies equal) directly into its
  shardings. Returns (state, shardings)."""
  def init():
    variables = initial_variables(config, model)
    return train_state.TrainState.create(variables["params"], tx, variables["batch_stats"],
                                         with_target=True, with_ema=True)

  abstract = jax.eval_shape(init)
  shardings = parallel.state_shardings(abstract, mesh, fsdp=config.mesh.fsdp,
                                       min_size=config.mesh.fsdp_min_size)
  return jax.jit(init, out_shardings=shardings)(), shardings


def train_update(state, views, noise, index, *, apply_fn, tx, config):
  """One update of `state` for given inputs: (state, metrics).

  Args:
    state: the pre-training TrainState (every field filled).
    views: {"x", "a1", "a2"}: model-space float32 images [B, H, W, C] in [-1, 1].
    noise: ε, float32 [B, H, W, C], standard normal (model space: the step
      scales it by the grid's σ), one draw per image shared by every term.
    index: int32 scalar grid index i in {0, …, N(step) − 2}.
    apply_fn: `RCMEncoder.apply`; tx: the optax optimizer (`optim.pretrain_optimizer`).
    config: the pre-training config (denoiser, temperature, scales, target_ema,
      optim, total_steps, ema_rate).

  Metrics: loss, contrast, consistency, grad_norm (before clipping),
  grad_norm_clipped (after), param_norm, lr, target_ema, num_scales, grid_index.
  """
  step = state.step
  sched, ema_cfg, optim = config.scales, config.target_ema, config.optim
  num_scales = schedules.num_scales(step, sched.total_steps, sched.start, sched.end)
  loss_fn = functools.partial(losses.pretrain_loss, apply_fn=apply_fn,
                              denoiser_cfg=config.denoiser, temperature=config.temperature)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.target_params, state.batch_stats, state.target_batch_stats,
      views, noise, index, num_scales)
  grad_norm = optax.tree.norm(grads)
  scale = schedules.clip_scale(grad_norm, step, optim.warmup_steps, optim.grad_clip)
  grads = jax.tree.map(lambda g: g * scale, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  mu = schedules.target_ema(step, ema_cfg.decay_steps, ema_cfg.start, ema_cfg.end, ema_cfg.A)
  ema = lambda avg, new, rate: jax.tree.map(lambda a, p: rate * a + (1 - rate) * p, avg, new)
  new_state = state.replace(
      step=step + 1, params=params, opt_state=opt_state, batch_stats=aux["batch_stats"],
      target_params=ema(state.target_params, params, mu),
      target_batch_stats=aux["target_batch_stats"],
      ema_params=ema(state.ema_params, params, config.ema_rate))
  metrics = dict(loss=loss, contrast=jnp.mean(aux["contrast"]),
                 consistency=jnp.mean(aux["consistency"]), grad_norm=grad_norm,
                 grad_norm_clipped=grad_norm * scale,   # the norm of the scaled gradient
                 param_norm=optax.tree.norm(params),
                 lr=schedules.learning_rate(step, optim.lr, optim.warmup_steps,
                                            config.total_steps),
                 target_ema=mu, num_scales=num_scales, grid_index=index)
  return new_state, metrics


def make_train_step(config, model, tx, mesh, shardings):
  """The jitted step: (state, batch of uint8 views [B, H, W, C], key) -> (state, metrics).

  key = fold_in(key, step) gives one grid index per global batch and one ε per
  image; the number of scales is a traced function of the step (no
  recompilation as it grows). The state is donated.
  """
  sched = config.scales
  update = functools.partial(train_update, apply_fn=model.apply, tx=tx, config=config)
  batch_sharding = parallel.data_sharding(mesh)

  def step_fn(state, batch, key):
    key_index, key_noise = jax.random.split(jax.random.fold_in(key, state.step))
    num_scales = schedules.num_scales(state.step, sched.total_steps, sched.start, sched.end)
    index = jax.random.randint(key_index, (), 0, num_scales - 1)
    views = {k: denoiser.pixels_to_model(batch[k]) for k in ("x", "a1", "a2")}
    noise = jax.random.normal(key_noise, views["x"].shape, jnp.float32)
    noise = jax.lax.with_sharding_constraint(noise, batch_sharding)
    return update(state, views, noise, index)

  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding, parallel.replicated(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
