r"""rRCM pre-training: config -> mesh -> data -> state -> loop.

  python -m rrcm_jax.pretrain --config=configs/fashion_mnist_pretrain.py \
      --workdir=workdirs/fmnist_pretrain --config.total_steps=2000

A restart with the same workdir resumes from the newest complete checkpoint.
The library functions (`create_state`, `make_train_step`, `train`) are what
tests, notebooks and the other stages import.
"""
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rrcm_jax import checkpoints, denoiser, losses, models, parallel, schedules, train_state
from rrcm_jax import workdir as workdir_lib


# ----------------------------------------------------------------------------
# Config checks: before anything compiles.
# ----------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------
# Model, optimizer, state.
# ----------------------------------------------------------------------------
def trainable_labels(params):
  """"frozen" for the patch embedding when it is frozen, "train" elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(getattr(k, "key", None) == "patch_embed" for k in path)
      else "train", params)


def make_optimizer(config):
  """AdamW with warm-up + cosine; a frozen patch embedding gets no update at all."""
  o = config.optim
  lr = functools.partial(schedules.learning_rate, base_lr=o.lr, warmup_steps=o.warmup_steps,
                         total_steps=config.total_steps)
  adamw = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  if not config.model.frozen_patch_embed:
    return adamw
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, trainable_labels)


def sample_inputs(model_cfg, batch=2):
  x = jnp.zeros((batch, model_cfg.image_size, model_cfg.image_size, model_cfg.channels))
  return x, jnp.zeros((batch,))


def create_state(config, model, tx, mesh):
  """Initializes the state directly into its shardings. Returns (state, shardings)."""
  def init():
    variables = model.init(jax.random.key(config.seed), *sample_inputs(config.model), train=True)
    return train_state.TrainState.create(variables["params"], tx, variables["batch_stats"],
                                         with_target=True, with_ema=True)

  abstract = jax.eval_shape(init)
  shardings = parallel.state_shardings(abstract, mesh, fsdp=config.mesh.fsdp,
                                       min_size=config.mesh.fsdp_min_size)
  return jax.jit(init, out_shardings=shardings)(), shardings


# ----------------------------------------------------------------------------
# One step.
# ----------------------------------------------------------------------------
def make_train_step(config, model, tx, mesh, shardings):
  """The jitted step: (state, batch of uint8 views, key) -> (state, metrics).

  One grid index per global batch, one ε per image; the number of scales is a
  traced function of the step (no recompilation as it grows).
  """
  sched, ema_cfg, optim = config.scales, config.target_ema, config.optim
  loss_fn = functools.partial(losses.pretrain_loss, apply_fn=model.apply,
                              denoiser_cfg=config.denoiser, temperature=config.temperature)
  batch_sharding = parallel.data_sharding(mesh)

  def step_fn(state, batch, key):
    step = state.step
    key_index, key_noise = jax.random.split(jax.random.fold_in(key, step))
    num_scales = schedules.num_scales(step, sched.total_steps, sched.start, sched.end)
    index = jax.random.randint(key_index, (), 0, num_scales - 1)
    views = {k: denoiser.pixels_to_model(batch[k]) for k in ("x", "a1", "a2")}
    noise = jax.random.normal(key_noise, views["x"].shape, jnp.float32)
    noise = jax.lax.with_sharding_constraint(noise, batch_sharding)

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
                   param_norm=optax.tree.norm(params),
                   lr=schedules.learning_rate(step, optim.lr, optim.warmup_steps,
                                              config.total_steps),
                   target_ema=mu, num_scales=num_scales, grid_index=index)
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding, parallel.replicated(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------
def _default_batches(config, start_step):
  from rrcm_jax.data import pipelines  # pylint: disable=g-import-not-at-top  (TF only here)
  return pipelines.pretrain_batches(config.data, global_batch_size=config.batch_size,
                                    seed=config.seed, start_step=start_step)


def train(config, workdir, batches=None, mesh=None, stop_after=None):
  """Pre-trains (or resumes) in `workdir`; returns the final state.

  Args:
    batches: optional callable start_step -> iterator of per-process numpy dicts
      (x, a1, a2 uint8 [local_batch, H, W, C]); default: the config's pipeline.
    stop_after: stop (with a checkpoint) after this many steps of this call, to
      simulate an interruption in tests.
  """
  mesh = mesh or parallel.make_mesh()
  validate_config(config, mesh)
  workdir_lib.ensure_writable(workdir)
  model = models.rcm_encoder(config.model)
  tx = make_optimizer(config)
  state, shardings = create_state(config, model, tx, mesh)
  ckpt = checkpoints.Checkpointer(workdir, config.save_every, config.latest_every)
  restored = ckpt.restore(checkpoints.abstract_like(state, shardings))
  if restored is not None:
    state = restored[0]
  start = int(state.step)
  workdir_lib.record_run(workdir, config)
  if start >= config.total_steps:
    ckpt.close()
    return state
  if jax.process_index() == 0:
    n = models.count_params(state.params)
    print(f"pre-training {n:,} parameters on {mesh.devices.size} device(s), "
          f"{'resuming at' if start else 'starting at'} step {start}", flush=True)

  step_fn = make_train_step(config, model, tx, mesh, shardings)
  key = jax.random.key(config.seed)
  local = (batches or functools.partial(_default_batches, config))(start)
  metrics_writer = workdir_lib.MetricsWriter(workdir)
  progress = workdir_lib.Progress(config.total_steps, "step", start=start)
  watcher = checkpoints.PreemptionWatcher()
  pending, window_start, window_steps = [], time.time(), 0
  last = min(config.total_steps, start + stop_after) if stop_after else config.total_steps
  try:
    for step in range(start, last):
      batch = parallel.global_batch(next(local), mesh)
      state, metrics = step_fn(state, batch, key)
      pending.append((step, metrics))
      window_steps += 1
      done = step + 1
      stop = watcher.should_stop(done) or done == last
      if done % config.log_every == 0 or ckpt.manager.should_save(done) or stop:
        checkpoints.check_finite(pending, ckpt)
        elapsed = time.time() - window_start
        row = {k: float(v) for k, v in pending[-1][1].items()}
        row["images_per_s"] = config.batch_size * window_steps / max(elapsed, 1e-9)
        metrics_writer.write(done, row)
        progress.update(done, loss=row["loss"], img_s=round(row["images_per_s"], 1),
                        N=int(row["num_scales"]))
        pending, window_start, window_steps = [], time.time(), 0
        ckpt.save(done, state, meta=dict(total_steps=config.total_steps), force=stop)
      if stop:
        if done < last and jax.process_index() == 0:
          print(f"preempted: checkpoint written at step {done}", flush=True)
        break
  finally:
    watcher.restore_handler()
    ckpt.close()
  return state


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  config = flags.FLAGS.config
  train(config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from rrcm_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, sys.argv)
