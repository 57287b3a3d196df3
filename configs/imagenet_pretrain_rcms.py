r"""Paper row: ImageNet RCM-S pre-training (docs/method.md, Pre-training objective, "Paper configs").

  python -m rrcm_jax.pretrain --config=configs/imagenet_pretrain_rcms.py \
      --workdir=gs://BUCKET/rrcm/imagenet_rcms_pretrain

Batch 4096, 600k steps, lr 1e-4, weight decay 0.01, warm-up 10k, EMA model
0.99, target EMA A = 10 over 600k steps, width 512, depth 6, 8 heads,
projection hidden 2048, frozen patch embedding and MoCo-v3 init.
"""
from configs import common


def get_config(arg=None):
  del arg
  config = common.pretrain_config(total_steps=600_000, batch_size=4096, lr=1e-4,
                                  weight_decay=0.01, warmup_divisor=60, ema_rate=0.99,
                                  target_ema_A=10)
  config.data = common.data_config("imagenet2012", image_size=224, channels=3, num_classes=1000)
  config.data.eval_split = "validation"
  config.data.cache = False
  config.model = common.model_config(width=512, depth=6, num_heads=8, patch_size=16,
                                     image_size=224, channels=3, proj_hidden=2048)
  config.model.frozen_patch_embed = True
  config.model.init = "mocov3"
  config.model.dtype = "bfloat16"
  return config
