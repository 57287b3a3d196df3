r"""Equal-FLOP training budgets of the from-scratch baselines.

The baselines get the training FLOPs of rRCM's pipeline: its *whole*
pre-training plus its fine-tuning at one σ. FLOPs come from
`rrcm_jax.flops` (a forward without gradient counts 1, forward + backward 3,
target-network forwards included). The configs state the resulting steps
per epoch; tests check them against these functions.

  python -m experiments.budgets                       # both experiments' schedules
  python -m experiments.budgets --pretrain_steps 300  # the demo baselines for a
                                                      # 300-step pre-training

The demo baselines (configs/fashion_mnist_gaussian_scratch.py,
configs/fashion_mnist_consistency_scratch.py) match the Fashion-MNIST demo
(configs/fashion_mnist_pretrain.py + configs/fashion_mnist_finetune.py); the
replication's (configs/fashion_mnist_replication.py) match its rRCM run.
"""
import argparse
import math

from configs import common
from configs import fashion_mnist_consistency_scratch, fashion_mnist_gaussian_scratch
from configs import fashion_mnist_replication as rep
from rrcm_jax import flops

DEMO_TRAIN_EXAMPLES = 54_000   # Fashion-MNIST train[:90%], the demo's fine-tuning split
STAGE_OF = {"gaussian": "finetune", "consistency": "consistency", "rrcm": "consistency"}


def _steps(budget, stage, model_cfg, batch_size, num_classes, epochs):
  """(epochs, steps_per_epoch) whose `stage` training spends at least `budget` FLOPs."""
  per_step = flops.training_flops(stage, model_cfg, batch_size, num_classes)
  return epochs, math.ceil(math.ceil(budget / per_step) / epochs)


# ----------------------------------------------------------------------------
# The Fashion-MNIST demo.
# ----------------------------------------------------------------------------
def demo_budget_flops(pretrain_steps=None):
  """Training FLOPs of the demo's pre-training (`pretrain_steps`, default the
  config's) + its consistency fine-tuning."""
  pre, ft = common.demo_pretrain_config(), common.demo_finetune_config(0.25)
  steps = pre.total_steps if pretrain_steps is None else pretrain_steps
  pre_flops = flops.training_flops("pretrain", pre.model, steps * pre.batch_size)
  ft_images = ft.epochs * (DEMO_TRAIN_EXAMPLES // ft.batch_size) * ft.batch_size
  return pre_flops + flops.training_flops("consistency", ft.model, ft_images,
                                          ft.data.num_classes)


def demo_scratch_schedule(config, pretrain_steps=None):
  """(epochs, steps_per_epoch) of a demo baseline `config` (task "finetune" or
  "consistency") that spends the demo's budget."""
  return _steps(demo_budget_flops(pretrain_steps), config.task, config.model, config.batch_size,
                config.data.num_classes, config.epochs)


# ----------------------------------------------------------------------------
# The replication.
# ----------------------------------------------------------------------------
def pretrain_flops(quick=False):
  """Training FLOPs of the replication's whole rRCM pre-training."""
  pre = rep.pretrain_config(quick)
  return flops.training_flops("pretrain", pre.model, pre.total_steps * pre.batch_size)


def method_flops(method, quick=False):
  """Training FLOPs of `method` at one σ as its config schedules it (rRCM: with
  the pre-training). The counts the runs log (`train_flops`, `total_flops`)
  equal these."""
  config = rep.finetune_config(method, 0.25, quick)
  images = config.epochs * config.steps_per_epoch * config.batch_size
  total = flops.training_flops(STAGE_OF[method], config.model, images, rep.NUM_CLASSES)
  return total + (pretrain_flops(quick) if method == "rrcm" else 0.0)


def budget_flops(quick=False):
  """The per-σ budget every replication method gets: rRCM's pre-training + fine-tuning."""
  return method_flops("rrcm", quick)


def scaled_flops(method, scale, quick=False):
  """Training FLOPs of `method` at the budget multiple `scale` (config argument scale=)."""
  pre = rep.pretrain_config(quick, scale) if method == "rrcm" else None
  config = rep.finetune_config(method, 0.25, quick, scale=scale)
  images = config.epochs * config.steps_per_epoch * config.batch_size
  total = flops.training_flops(STAGE_OF[method], config.model, images, rep.NUM_CLASSES)
  if pre is not None:
    total += flops.training_flops("pretrain", pre.model, pre.total_steps * pre.batch_size)
  return total


def clean_step_flops(quick=False):
  """Training FLOPs of one step of DDS's clean classifier (batch `batch`)."""
  return flops.training_flops("clean", rep.model_config(), rep.SIZES[quick].batch,
                              rep.NUM_CLASSES)


def denoiser_step_flops(quick=False):
  """Training FLOPs of one step of DDS's denoiser: 3 × the U-Net's forward × the batch
  (the count `python -m rrcm_jax.diffusion` logs as train_flops)."""
  from rrcm_jax.diffusion import train  # pylint: disable=g-import-not-at-top
  config = rep.denoiser_config(rep.CLEAN_SHARES[0], quick)
  unet = train.build_unet(config.unet)
  return 3 * train.unet_forward_flops(unet, config.data.image_size) * config.batch_size


def dds_schedule(share, quick=False, budget=None):
  """(clean classifier steps, denoiser steps) spending `share` and 1 − `share` of the
  per-σ budget (default `budget_flops`): the DDS arm's two trainings together."""
  budget = budget_flops(quick) if budget is None else budget
  return (math.ceil(share * budget / clean_step_flops(quick)),
          math.ceil((1 - share) * budget / denoiser_step_flops(quick)))


def dds_flops(share, quick=False):
  """(clean classifier, denoiser) training FLOPs as the config schedules them at `share`."""
  clean = rep.clean_config(share, quick)
  return (clean.epochs * clean.steps_per_epoch * clean_step_flops(quick),
          rep.denoiser_config(share, quick).total_steps * denoiser_step_flops(quick))


def per_sigma_flops(own, shared, served):
  """Training FLOPs charged to one σ under the two accountings: {"full": the shared
  training (rRCM's pre-training, DDS's denoiser and classifier) counted in full at each σ,
  "once": divided among the `served` σ it serves}."""
  if served < 1:
    raise ValueError(f"served must count at least one σ, got {served}.")
  return dict(full=own + shared, once=own + shared / served)


def scratch_schedule(method, quick=False):
  """(epochs, steps_per_epoch) of a replication baseline that spends the budget."""
  s = rep.SIZES[quick]
  return _steps(budget_flops(quick), STAGE_OF[method], rep.model_config(), s.batch,
                rep.NUM_CLASSES, s.scratch_epochs)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pretrain_steps", type=int, default=None,
                      help="the demo pre-training's steps the demo baselines match "
                           "(default: configs/fashion_mnist_pretrain.py's)")
  args = parser.parse_args(argv)
  if args.pretrain_steps is not None and args.pretrain_steps < 1:
    parser.error(f"--pretrain_steps must be a positive integer, got {args.pretrain_steps}.")
  print(f"demo budget: {demo_budget_flops(args.pretrain_steps) / 1e12:.3f} TFLOP")
  for module in (fashion_mnist_gaussian_scratch, fashion_mnist_consistency_scratch):
    config = module.get_config()
    epochs, steps = demo_scratch_schedule(config, args.pretrain_steps)
    print(f"  {module.__name__.split('.')[-1]}: {epochs} epochs, "
          f"--config.steps_per_epoch={steps}")
  for quick in (False, True):
    print(f"replication{' (quick)' if quick else ''} budget per σ: "
          f"{budget_flops(quick) / 1e12:.3f} TFLOP")
    for method in ("gaussian", "consistency"):
      epochs, steps = scratch_schedule(method, quick)
      print(f"  {method}: {epochs} epochs × {steps} steps")
    for share in rep.CLEAN_SHARES:
      clean, denoiser = dds_schedule(share, quick)
      print(f"  dds, classifier share {share}: {clean} classifier steps, {denoiser} denoiser "
            "steps")


if __name__ == "__main__":
  main()
