r"""Baseline: the Fashion-MNIST ViT from scratch with Gaussian noise augmentation (Cohen et al. 2019).

  python -m rrcm_jax.finetune --config=configs/fashion_mnist_gaussian_scratch.py \
      --workdir=workdirs/fmnist/gaussian_scratch --config.sigma=0.25

The model, data, σ, noise conditioning (grid point nearest 2σ of an N = 81
grid) and evaluation of configs/fashion_mnist_finetune.py, but no pre-trained
encoder, plain cross-entropy on x + 2σε (model space), every parameter
trained, no layer decay. The training budget equals, in FLOPs, rRCM's
Fashion-MNIST pipeline: pre-training for `arg` steps (default: the
fashion_mnist_pretrain.py default) plus fashion_mnist_finetune.py's epochs,
e.g. `fashion_mnist_gaussian_scratch.py:300` matches a 300-step pre-training.
`config.epochs` evaluations, `steps_per_epoch` set so that the total steps
meet the budget (FLOPs: forward 1, forward + backward 3; `classify.FORWARD_EQUIVALENTS`).
"""
import math

from configs import fashion_mnist_finetune, fashion_mnist_pretrain

TRAIN_EXAMPLES = 54_000   # Fashion-MNIST train[:90%]


def rrcm_budget_flops(pretrain_steps=None):
  """Training FLOPs of rRCM's Fashion-MNIST pre-training + consistency fine-tuning."""
  from rrcm_jax import classify  # pylint: disable=g-import-not-at-top  (the one FLOP formula)
  pre, ft = fashion_mnist_pretrain.get_config(), fashion_mnist_finetune.get_config()
  steps = pre.total_steps if pretrain_steps is None else pretrain_steps
  pre_flops = classify.training_flops("pretrain", pre.model, steps * pre.batch_size)
  ft_images = ft.epochs * (TRAIN_EXAMPLES // ft.batch_size) * ft.batch_size
  return pre_flops + classify.training_flops("consistency", ft.model, ft_images,
                                             ft.data.num_classes)


def budget_schedule(config, stage, pretrain_steps=None):
  """Sets config.steps_per_epoch so that config.epochs epochs of `stage` cost rRCM's FLOPs."""
  from rrcm_jax import classify  # pylint: disable=g-import-not-at-top
  per_step = classify.training_flops(stage, config.model, config.batch_size,
                                     config.data.num_classes)
  total_steps = math.ceil(rrcm_budget_flops(pretrain_steps) / per_step)
  config.steps_per_epoch = math.ceil(total_steps / config.epochs)


def get_config(arg=None):
  config = fashion_mnist_finetune.get_config()
  config.task = "finetune"
  config.init_from = None
  config.train_head = True
  config.entropy_weight = 0.0        # Cohen et al.: cross-entropy only
  config.optim.layer_decay = 1.0     # nothing pre-trained to protect
  config.epochs = 8
  budget_schedule(config, "finetune", None if arg is None else int(arg))
  return config
