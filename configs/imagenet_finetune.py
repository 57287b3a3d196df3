r"""Paper rows: ImageNet fine-tuning of RCM-B for σ = 0.25, 0.5, 1.0 (docs/method.md, Fine-tuning).

  python -m rrcm_jax.finetune --config=configs/imagenet_finetune.py:sigma=0.5 \
      --workdir=gs://BUCKET/rrcm/imagenet_finetune_0.5 \
      --config.init_from=gs://BUCKET/rrcm/imagenet_rcmb_pretrain

| σ | batch | epochs | augmentation | base lr |
|---|---|---|---|---|
| 0.25 | 1024 | 150 | "autoaug" (RandAugment m9 mstd0.5) + label smoothing 0.1 | 2e-4 |
| 0.5 | 2048 | 50 | "strong" (random resized crop 0.4–1 + flip) | 2e-4 |
| 1.0 | 256 | 150 | "weak" (center crop + flip) | 1e-4 |

All: consistency regularization (λ 10 / 20 / 20, η 0.5), 5 warm-up epochs (lr
per epoch), weight decay 0, layer decay 0.65, mixup 0.8 + cutmix 1.0 (switch
0.5), final LayerNorm on, base lr × batch/256. The best checkpoints are chosen
on 1% of the training set held out (train[99%:]); the test split is ImageNet
validation. The argument `sigma=` (pixel space) is required.
"""
from configs import common

ROWS = {  # sigma: (batch, epochs, augment, lr, label smoothing)
    0.25: (1024, 150, "autoaug", 2e-4, 0.1),
    0.5: (2048, 50, "strong", 2e-4, 0.0),
    1.0: (256, 150, "weak", 1e-4, 0.0),
}


def get_config(arg=None):
  sigma = common.check_sigma(common.parse_arg(arg, sigma=(float, common.REQUIRED)).sigma)
  batch, epochs, augment, lr, smoothing = ROWS[sigma]
  config = common.finetune_config(common.setup("imagenet_rcmb"), sigma=sigma, epochs=epochs,
                                  warmup_epochs=5, batch_size=batch, lr=lr, layer_decay=0.65,
                                  weight_decay=0.0)
  config.consistency.lam = 10.0 if sigma == 0.25 else 20.0
  config.augment = augment
  config.mixup, config.cutmix, config.mixup_switch_prob = 0.8, 1.0, 0.5
  config.label_smoothing = smoothing
  config.final_norm = True
  config.data.train_split = "train[:99%]"
  config.data.val_split = "train[99%:]"
  config.eval_batch_size = 1024
  return config
