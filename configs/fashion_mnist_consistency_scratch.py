r"""Baseline: the Fashion-MNIST ViT from scratch with consistency regularization (Jeong & Shin 2020).

  python -m rrcm_jax.finetune --config=configs/fashion_mnist_consistency_scratch.py \
      --workdir=workdirs/fmnist/consistency_scratch --config.sigma=0.25

configs/fashion_mnist_finetune.py's consistency task (m = 2, λ, η) without a
pre-trained encoder: every parameter trains, the head included, no layer
decay. Same FLOP budget as rRCM's pipeline (see
configs/fashion_mnist_gaussian_scratch.py; `:300` matches a 300-step
pre-training).
"""
from configs import fashion_mnist_finetune, fashion_mnist_gaussian_scratch


def get_config(arg=None):
  config = fashion_mnist_finetune.get_config()
  config.init_from = None
  config.train_head = True
  config.optim.layer_decay = 1.0
  config.epochs = 4
  fashion_mnist_gaussian_scratch.budget_schedule(config, "consistency",
                                                 None if arg is None else int(arg))
  return config
