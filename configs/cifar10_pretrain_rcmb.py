r"""Paper row: CIFAR-10 RCM-B pre-training (docs/method.md, Pre-training objective, "Paper configs").

  python -m rrcm_jax.pretrain --config=configs/cifar10_pretrain_rcmb.py \
      --workdir=gs://BUCKET/rrcm/cifar10_rcmb_pretrain

Batch 2048, 300k steps, lr 1e-4, weight decay 0, warm-up 10k, EMA model 0.9999,
target EMA A = 15 over 300k steps, projection hidden 2048.
No config argument.
"""
from configs import common


def get_config(arg=None):
  common.parse_arg(arg)
  config = common.pretrain_config(total_steps=300_000, batch_size=2048, lr=1e-4,
                                  weight_decay=0.0, warmup_divisor=30, ema_rate=0.9999,
                                  target_ema_A=15)
  config.update(common.setup("cifar10_rcmb"))
  return config
