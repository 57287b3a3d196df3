r"""Paper row: ImageNet RCM-B pre-training (docs/method.md, Pre-training objective, "Paper configs").

  python -m rrcm_jax.pretrain --config=configs/imagenet_pretrain_rcmb.py \
      --workdir=gs://BUCKET/rrcm/imagenet_rcmb_pretrain

Batch 4096, 600k steps, lr 2e-4, weight decay 0.03, warm-up 15k, EMA model
0.99, target EMA A = 10 over 600k steps, projection hidden 4096, frozen patch
embedding and MoCo-v3 init. Use `--config.model.remat=True` and
`--config.mesh.fsdp=True` on GPUs (see README "Running at scale").
No config argument.
"""
from configs import common


def get_config(arg=None):
  common.parse_arg(arg)
  config = common.pretrain_config(total_steps=600_000, batch_size=4096, lr=2e-4,
                                  weight_decay=0.03, warmup_divisor=40, ema_rate=0.99,
                                  target_ema_A=10)
  config.update(common.setup("imagenet_rcmb"))
  return config
