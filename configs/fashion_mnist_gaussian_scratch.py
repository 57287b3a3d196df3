r"""Baseline: the Fashion-MNIST ViT from scratch with Gaussian noise augmentation (Cohen et al. 2019).

  python -m rrcm_jax.finetune --config=configs/fashion_mnist_gaussian_scratch.py \
      --workdir=workdirs/fmnist/gaussian_scratch --config.sigma=0.25

The model, data, σ, noise conditioning (grid point nearest 2σ of an N = 81
grid) and evaluation of configs/fashion_mnist_finetune.py, but no pre-trained
encoder, plain cross-entropy on x + 2σε (model space), every parameter
trained, no layer decay. The training budget equals, in FLOPs, rRCM's
Fashion-MNIST pipeline (the 2,000-step pre-training plus the 2-epoch
fine-tuning): 8 evaluations (epochs) of 724 steps (FLOPs: forward 1,
forward + backward 3; `rrcm_jax.flops`). For another pre-training length,
`python -m experiments.budgets --pretrain_steps 300` prints the
`--config.steps_per_epoch` that matches it (288 for 300 steps).
Argument: `sigma=` (default 0.25).
"""
from configs import common

STEPS_PER_EPOCH = 724   # experiments/budgets.py, demo_scratch_schedule (checked by the tests)


def get_config(arg=None):
  sigma = common.check_sigma(common.parse_arg(arg, sigma=0.25).sigma)
  config = common.demo_finetune_config(sigma)
  config.task = "finetune"
  config.init_from = None
  config.train_head = True
  config.entropy_weight = 0.0        # Cohen et al.: cross-entropy only
  config.optim.layer_decay = 1.0     # nothing pre-trained to protect
  config.epochs = 8
  config.steps_per_epoch = STEPS_PER_EPOCH
  return config
