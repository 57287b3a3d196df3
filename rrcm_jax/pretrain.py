r"""rRCM pre-training: config -> mesh -> data -> state -> loop.

  python -m rrcm_jax.pretrain --config=configs/fashion_mnist_pretrain.py \
      --workdir=workdirs/fmnist_pretrain --config.total_steps=2000

A restart with the same workdir resumes from the newest complete checkpoint.
Exit status 0 when the run is complete, 75 when SIGTERM stopped it (a
checkpoint is written: rerun the same command to resume), 2 on bad input.
The step, its state and the optimizer live in `rrcm_jax.pretrain_step` and
`rrcm_jax.optim`; the loop in `rrcm_jax.loop`.
"""
import functools
import sys
import time

import jax
from etils import epath

from rrcm_jax import checkpoints, config_checks, loop, models, optim, parallel, pretrain_step
from rrcm_jax import workdir as workdir_lib
from rrcm_jax.data import device
from rrcm_jax.evaluators import knn_monitor


def _global_batches(config, mesh, batches, start_step):
  """Global batches from start_step on: `batches` (per-process numpy, tests), the device
  pipeline's (already global arrays) or tf.data's (per-process, made global here)."""
  if batches is None and config.data.pipeline == "device":
    return device.ConfigData(config, mesh).pretrain(start_step)
  if batches is None:
    from rrcm_jax.data import pipelines  # pylint: disable=g-import-not-at-top  (TF only here)
    batches = functools.partial(pipelines.pretrain_batches, config.data,
                                global_batch_size=config.batch_size, seed=config.seed)
    local = batches(start_step=start_step)
  else:
    local = batches(start_step)
  return (parallel.global_batch(b, mesh) for b in local)


def _knn_monitor(config, state, writer, start):
  """(every, fn) for `loop.run`'s monitor, or None; logs step 0 (with the pixel baseline)
  before training when the run starts there."""
  if not config.get("knn_every", 0):
    return None
  monitor = knn_monitor.KnnMonitor(config)
  if start == 0:
    writer.write(0, monitor.during_training(state, 0))
  return config.knn_every, monitor.during_training


def train(config, workdir, batches=None, mesh=None, stop_after=None):
  """Pre-trains (or resumes) in `workdir`; returns the final state.

  Args:
    batches: optional callable start_step -> iterator of per-process numpy dicts
      (x, a1, a2 uint8 [local_batch, H, W, C]); default: the config's pipeline
      (config.data.pipeline: "device", "tfdata", or None: chosen by the dataset).
    stop_after: stop (with a checkpoint) after this many steps of this call, to
      simulate an interruption in tests.

  Raises:
    loop.Preempted: SIGTERM stopped the run (after a checkpoint).
  """
  # Config and mesh.
  mesh = mesh or parallel.make_mesh()
  config = device.resolve_pipeline(config)
  pretrain_step.validate_config(config, mesh)
  if config.get("knn_every", 0) < 0:
    raise ValueError(f"config.knn_every={config.knn_every} must be >= 0 (0: no k-NN monitor).")
  workdir_lib.ensure_writable(workdir)

  # State: fresh, or the newest checkpoint.
  model = models.rcm_encoder(config.model)
  tx = optim.pretrain_optimizer(config)
  state, shardings = pretrain_step.create_state(config, model, tx, mesh)
  ckpt = checkpoints.Checkpointer(workdir, config.save_every, config.latest_every)
  writer = workdir_lib.MetricsWriter(workdir)
  try:
    restored = ckpt.restore(checkpoints.abstract_like(state, shardings))
    if restored is not None:
      state = restored[0]
    start = int(state.step)
    if start >= config.total_steps:
      return state
    if jax.process_index() == 0:
      print(f"pre-training {models.count_params(state.params):,} parameters on "
            f"{mesh.devices.size} device(s), {'resuming at' if start else 'starting at'} "
            f"step {start}", flush=True)

    # Data, monitor, step, loop.
    global_batches = _global_batches(config, mesh, batches, start)
    monitor = _knn_monitor(config, state, writer, start)
    # After data and model: a run that fails to set up leaves no record.
    workdir_lib.record_run(workdir, config, writer=writer)
    return loop.run(
        state, pretrain_step.make_train_step(config, model, tx, mesh, shardings),
        global_batches, key=jax.random.key(config.seed), checkpointer=ckpt, writer=writer,
        monitor=monitor,
        total_steps=config.total_steps, batch_size=config.batch_size,
        log_every=config.log_every, stop_after=stop_after,
        progress_fn=lambda row: dict(loss=row["loss"], img_s=round(row["images_per_s"], 1),
                                     N=int(row["num_scales"])),
        meta_fn=lambda done: dict(total_steps=config.total_steps),
        profile=loop.Profile.from_config(config, workdir))
  finally:
    ckpt.close()
    writer.close()


ESTIMATE_STEPS = 5   # steps timed after the compiling one


def _resume_step(workdir):
  """The newest checkpoint's step in `workdir` (0 when there is none); creates nothing."""
  if not (epath.Path(workdir) / "checkpoints").is_dir():
    return 0
  ckpt = checkpoints.Checkpointer(workdir)
  try:
    return ckpt.latest_step() or 0
  finally:
    ckpt.close()


def estimate(config, workdir, batches=None, mesh=None, steps=ESTIMATE_STEPS):
  """Compiles the step, times `steps` steps (input pipeline included) and prints the
  expected wall time of the remaining steps, compilation excluded; writes nothing.

  Returns dict(steps_s, remaining_steps, seconds, compile_s).
  """
  mesh = mesh or parallel.make_mesh()
  config = device.resolve_pipeline(config)
  pretrain_step.validate_config(config, mesh)
  model = models.rcm_encoder(config.model)
  tx = optim.pretrain_optimizer(config)
  state, shardings = pretrain_step.create_state(config, model, tx, mesh)
  step_fn = pretrain_step.make_train_step(config, model, tx, mesh, shardings)
  start = _resume_step(workdir)
  data = _global_batches(config, mesh, batches, start)
  key = jax.random.key(config.seed)
  began = time.perf_counter()
  state, metrics = step_fn(state, next(data), key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - began
  began = time.perf_counter()
  for _ in range(steps):
    state, metrics = step_fn(state, next(data), key)
  jax.block_until_ready(metrics)
  rate = steps / (time.perf_counter() - began)
  remaining = max(config.total_steps - start, 0)
  seconds = remaining / rate
  if jax.process_index() == 0:
    print(f"estimate: {remaining:,} of {config.total_steps:,} steps left at {rate:.3g} steps/s "
          f"({rate * config.batch_size:,.0f} images/s, batch {config.batch_size}, "
          f"{mesh.devices.size} device(s)): about {workdir_lib.format_duration(seconds)} of wall "
          f"time, compilation ({compile_s:.0f} s here) excluded; nothing was written.", flush=True)
  return dict(steps_s=rate, remaining_steps=remaining, seconds=seconds, compile_s=compile_s)


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config.get("estimate", False):
    estimate(config, workdir)
    return
  config_checks.run_trainer(train, config, workdir)


if __name__ == "__main__":
  from rrcm_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, sys.argv)
