r"""Baseline: the Fashion-MNIST ViT from scratch with consistency regularization (Jeong & Shin 2020).

  python -m rrcm_jax.finetune --config=configs/fashion_mnist_consistency_scratch.py \
      --workdir=workdirs/fmnist/consistency_scratch --config.sigma=0.25

configs/fashion_mnist_finetune.py's consistency task (m = 2, λ, η) without a
pre-trained encoder: every parameter trains, the head included, no layer
decay. Same FLOP budget as rRCM's pipeline (see
configs/fashion_mnist_gaussian_scratch.py): 4 epochs of 724 steps;
`python -m experiments.budgets --pretrain_steps 300` gives the steps that
match a 300-step pre-training. Argument: `sigma=` (default 0.25).
"""
from configs import common

STEPS_PER_EPOCH = 724   # experiments/budgets.py, demo_scratch_schedule (checked by the tests)


def get_config(arg=None):
  sigma = common.check_sigma(common.parse_arg(arg, sigma=0.25).sigma)
  config = common.demo_finetune_config(sigma)
  config.init_from = None
  config.train_head = True
  config.optim.layer_decay = 1.0
  config.epochs = 4
  config.steps_per_epoch = STEPS_PER_EPOCH
  return config
