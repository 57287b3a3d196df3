r"""rRCM fine-tuning on Fashion-MNIST: the classifier of configs/fashion_mnist_pretrain.py.

  python -m rrcm_jax.finetune --config=configs/fashion_mnist_finetune.py \
      --workdir=workdirs/fmnist/finetune --config.init_from=workdirs/fmnist/pretrain \
      --config.sigma=0.25

(`configs/fashion_mnist_finetune.py:sigma=0.5` sets sigma too.) The model
section is the pre-training config's (`common.setup("fashion_mnist")`), so the
checkpoint fits. Consistency regularization (m = 2, λ = 10 for σ = 0.25 else
20, η = 0.5), 2 epochs of 54,000 images (train[:90%]), batch 128, base lr
2e-3 (× 128/256) with a per-step warm-up + cosine; best checkpoints chosen on
train[90%:]. About 8 minutes on 2 CPU cores.

Unlike the reference (and `common.finetune_config`'s default), this demo
trains the linear head: with the head frozen at its 2e-5 initialization the
small encoder did not learn in this budget (validation accuracy 15% after 2
epochs, against 65% with the head trained; `--config.train_head=False`
reproduces it).
"""
from configs import common


def get_config(arg=None):
  sigma = common.check_sigma(common.parse_arg(arg, sigma=0.25).sigma)
  return common.demo_finetune_config(sigma)
