r"""Paper row: ImageNet RCM-S pre-training (docs/method.md, Pre-training objective, "Paper configs").

  python -m rrcm_jax.pretrain --config=configs/imagenet_pretrain_rcms.py \
      --workdir=gs://BUCKET/rrcm/imagenet_rcms_pretrain

Batch 4096, 600k steps, lr 1e-4, weight decay 0.01, warm-up 10k, EMA model
0.99, target EMA A = 10 over 600k steps, width 512, depth 6, 8 heads,
projection hidden 2048, frozen patch embedding and MoCo-v3 init.
No config argument.
"""
from configs import common


def get_config(arg=None):
  common.parse_arg(arg)
  config = common.pretrain_config(total_steps=600_000, batch_size=4096, lr=1e-4,
                                  weight_decay=0.01, warmup_divisor=60, ema_rate=0.99,
                                  target_ema_A=10)
  config.update(common.setup("imagenet_rcms"))
  return config
