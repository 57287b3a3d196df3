r"""rRCM pre-training on Fashion-MNIST: a small ViT that trains on a laptop CPU.

  python -m rrcm_jax.pretrain --config=configs/fashion_mnist_pretrain.py \
      --workdir=workdirs/fmnist/pretrain

28×28 grayscale images, patch 7 (16 patches, 18 tokens), width 64, depth 4,
4 heads (≈ 0.2 M parameters in the encoder, ≈ 3.7 M multiply-adds per
forward): demo size, so that the README's first command (pre-train,
fine-tune, certify) fits in about 20 minutes on 2 CPU cores.
Everything derived from `total_steps` (warm-up, target-EMA decay, icm
horizon) follows an override of it. No config argument.
"""
from configs import common


def get_config(arg=None):
  common.parse_arg(arg)
  return common.demo_pretrain_config()
