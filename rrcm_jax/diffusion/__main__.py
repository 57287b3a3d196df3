r"""Training the DDS denoiser: config -> mesh -> data -> state -> loop.

  python -m rrcm_jax.diffusion --config=configs/fashion_mnist_diffusion.py \
      --workdir=workdirs/fmnist/diffusion --config.total_steps=4000

ε-prediction DDPM training of the config's U-Net on the clean training
images (`rrcm_jax.diffusion.train`); the EMA weights are what certification
denoises with (`python -m rrcm_jax.certify --config=configs/fashion_mnist_dds_certify.py
--config.dds.denoiser=<this workdir>`). A restart with the same workdir
resumes from the newest complete checkpoint. Exit status 0 when the run is
complete, 75 when SIGTERM stopped it (checkpoint written: rerun to resume), 2
on bad input. Data: `config.data.pipeline` "device" (in-memory datasets,
batches built on the devices, `rrcm_jax.data.device`) or "tfdata".
"""
import sys

import jax

from rrcm_jax import checkpoints, config_checks, loop, models, parallel
from rrcm_jax import workdir as workdir_lib
from rrcm_jax.diffusion import train as train_lib

PIPELINES = ("device", "tfdata")
IN_MEMORY = ("fashion_mnist", "mnist", "cifar10", "cifar100")   # data.pipeline None -> "device"


def _pipeline(config):
  pipeline = config.data.get("pipeline")
  if pipeline is None:
    return "device" if config.data.name in IN_MEMORY else "tfdata"
  return pipeline


def _default_batches(config, mesh, start_step):
  """Global {"image", "label"} batches of the clean training split from `start_step` on."""
  if _pipeline(config) == "device":
    from rrcm_jax.data import device  # pylint: disable=g-import-not-at-top
    data = device.DeviceData.from_config(config.data, config.data.train_split, mesh, config.seed)
    return data.finetune_batches(start_step, config.batch_size, config.augment)
  from rrcm_jax.data import pipelines  # pylint: disable=g-import-not-at-top  (TensorFlow)
  local = pipelines.finetune_batches(config.data, split=config.data.train_split,
                                     global_batch_size=config.batch_size, seed=config.seed,
                                     start_step=start_step, augment=config.augment)
  return (parallel.global_batch(b, mesh) for b in local)


def train(config, workdir, batches=None, mesh=None, stop_after=None):
  """Trains (or resumes) the denoiser in `workdir`; returns the final state.

  Args:
    batches: optional callable start_step -> iterator of per-process numpy dicts
      {"image": uint8 [local_batch, H, W, C]}; default: the config's pipeline.
    stop_after: stop (with a checkpoint) after this many steps of this call (tests).

  Raises:
    loop.Preempted: SIGTERM stopped the run (after a checkpoint).
  """
  # Config and mesh.
  mesh = mesh or parallel.make_mesh()
  train_lib.validate_config(config, mesh)
  if _pipeline(config) not in PIPELINES:
    raise ValueError(f"config.data.pipeline must be one of {PIPELINES} (or None: device for "
                     f"{IN_MEMORY}), got {config.data.pipeline!r}.")
  workdir_lib.ensure_writable(workdir)

  # State: fresh, or the newest checkpoint.
  unet = train_lib.build_unet(config.unet)
  tx, lr_fn = train_lib.optimizer(config)
  state, shardings = train_lib.create_state(config, unet, tx, mesh)
  flops_per_image = 3 * train_lib.unet_forward_flops(unet, config.data.image_size)
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
      print(f"training the denoiser ({models.count_params(state.params):,} parameters, "
            f"{flops_per_image / 3e9:.3f} GFLOP per forward) on {mesh.devices.size} device(s), "
            f"{'resuming at' if start else 'starting at'} step {start}", flush=True)

    # Data, step, loop.
    if batches is None:
      stream = _default_batches(config, mesh, start)
    else:
      stream = (parallel.global_batch(b, mesh) for b in batches(start))
    flops = lambda done: dict(train_flops=done * config.batch_size * flops_per_image)
    # After data and model: a run that fails to set up leaves no record.
    workdir_lib.record_run(workdir, config, writer=writer)
    return loop.run(
        state, train_lib.make_train_step(config, unet, tx, lr_fn, mesh, shardings), stream,
        key=jax.random.key(config.seed), checkpointer=ckpt, writer=writer,
        total_steps=config.total_steps, batch_size=config.batch_size,
        log_every=config.log_every, stop_after=stop_after, row_fn=flops,
        meta_fn=lambda done: dict(total_steps=config.total_steps, **flops(done)),
        profile=loop.Profile.from_config(config, workdir))
  finally:
    ckpt.close()
    writer.close()


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  config_checks.run_trainer(train, config, workdir)


if __name__ == "__main__":
  from rrcm_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, sys.argv)
