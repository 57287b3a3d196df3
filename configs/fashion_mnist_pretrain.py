r"""rRCM pre-training on Fashion-MNIST: a small ViT that trains on a laptop CPU.

  python -m rrcm_jax.pretrain --config=configs/fashion_mnist_pretrain.py \
      --workdir=workdirs/fmnist/pretrain

28×28 grayscale images, patch 7 (16 patches, 18 tokens), width 64, depth 4,
4 heads (≈ 0.2 M parameters in the encoder, ≈ 3.7 M multiply-adds per
forward): demo size, so that the README's first command (pre-train,
fine-tune, certify) fits in about 20 minutes on 2 CPU cores.
Everything derived from `total_steps` (warm-up, target-EMA decay, icm
horizon) follows an override of it.
"""
from configs import common


def get_config(arg=None):
  del arg
  config = common.pretrain_config(total_steps=2000, batch_size=64, lr=1e-3, weight_decay=0.0,
                                  warmup_divisor=20, ema_rate=0.999, target_ema_A=15)
  config.data = common.data_config("fashion_mnist", image_size=28, channels=1, num_classes=10)
  config.model = common.model_config(width=64, depth=4, num_heads=4, patch_size=7, image_size=28,
                                     channels=1, proj_hidden=256, proj_out=64)
  config.log_every = 50
  config.latest_every = 200
  config.save_every = 1000
  return config
