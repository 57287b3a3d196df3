r"""Paper rows: CIFAR-10 fine-tuning of RCM-B for σ = 0.25, 0.5, 1.0 (docs/method.md, Fine-tuning).

  python -m rrcm_jax.finetune --config=configs/cifar10_finetune.py:sigma=0.25 \
      --workdir=gs://BUCKET/rrcm/cifar10_finetune_0.25 \
      --config.init_from=gs://BUCKET/rrcm/cifar10_rcmb_pretrain

Consistency regularization (m = 2, λ = 10 for σ = 0.25, 20 for 0.5 and 1.0,
η = 0.5), head untrained as the reference; 100 epochs (10 warm-up, lr per
epoch as the reference), batch 1024, base lr 2e-4 (× batch/256), weight decay
0, layer decay 0.75 (0.65 for σ = 1.0), no augmentation, no final LayerNorm.
The paper trains on all 50,000 images and picks checkpoints on the test set;
here 45,000 train and the best checkpoints are chosen on the held-out 5,000.
The argument `sigma=` (pixel space) is required.
"""
from configs import common


def get_config(arg=None):
  sigma = common.check_sigma(common.parse_arg(arg, sigma=(float, common.REQUIRED)).sigma)
  config = common.finetune_config(common.setup("cifar10_rcmb"), sigma=sigma, epochs=100,
                                  warmup_epochs=10, batch_size=1024, lr=2e-4,
                                  layer_decay=0.65 if sigma == 1.0 else 0.75, weight_decay=0.0)
  config.consistency.lam = 10.0 if sigma == 0.25 else 20.0
  config.augment = "none"
  config.final_norm = False
  return config
