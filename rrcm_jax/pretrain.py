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

import jax

from rrcm_jax import checkpoints, loop, models, optim, parallel, pretrain_step
from rrcm_jax import workdir as workdir_lib


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

  Raises:
    loop.Preempted: SIGTERM stopped the run (after a checkpoint).
  """
  # Config and mesh.
  mesh = mesh or parallel.make_mesh()
  pretrain_step.validate_config(config, mesh)
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
    workdir_lib.record_run(workdir, config)
    if start >= config.total_steps:
      return state
    if jax.process_index() == 0:
      print(f"pre-training {models.count_params(state.params):,} parameters on "
            f"{mesh.devices.size} device(s), {'resuming at' if start else 'starting at'} "
            f"step {start}", flush=True)

    # Data, step, loop.
    local = (batches or functools.partial(_default_batches, config))(start)
    return loop.run(
        state, pretrain_step.make_train_step(config, model, tx, mesh, shardings),
        (parallel.global_batch(b, mesh) for b in local), key=jax.random.key(config.seed),
        checkpointer=ckpt, writer=writer,
        total_steps=config.total_steps, batch_size=config.batch_size,
        log_every=config.log_every, stop_after=stop_after,
        progress_fn=lambda row: dict(loss=row["loss"], img_s=round(row["images_per_s"], 1),
                                     N=int(row["num_scales"])),
        meta_fn=lambda done: dict(total_steps=config.total_steps))
  finally:
    ckpt.close()
    writer.close()


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from rrcm_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, sys.argv)
