r"""Paper row: CIFAR-10 RCM-B pre-training (docs/method.md, Pre-training objective, "Paper configs").

  python -m rrcm_jax.pretrain --config=configs/cifar10_pretrain_rcmb.py \
      --workdir=gs://BUCKET/rrcm/cifar10_rcmb_pretrain

Batch 2048, 300k steps, lr 1e-4, weight decay 0, warm-up 10k, EMA model 0.9999,
target EMA A = 15 over 300k steps, projection hidden 2048.
"""
from configs import common


def get_config(arg=None):
  del arg
  config = common.pretrain_config(total_steps=300_000, batch_size=2048, lr=1e-4,
                                  weight_decay=0.0, warmup_divisor=30, ema_rate=0.9999,
                                  target_ema_A=15)
  config.data = common.data_config("cifar10", image_size=32, channels=3, num_classes=10)
  config.data.shuffle_buffer = 50_000
  config.model = common.model_config(width=768, depth=12, num_heads=12, patch_size=4,
                                     image_size=32, channels=3, proj_hidden=2048)
  config.model.dtype = "bfloat16"   # the reference trains in fp16 autocast
  return config
