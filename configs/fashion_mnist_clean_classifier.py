r"""The base classifier of diffusion denoised smoothing on Fashion-MNIST: the demo ViT trained
from scratch on clean images.

  python -m rrcm_jax.finetune --config=configs/fashion_mnist_clean_classifier.py \
      --workdir=workdirs/fmnist/clean_classifier

The model, data and evaluation of configs/fashion_mnist_finetune.py (width
64, depth 4, patch 7), task "clean": cross-entropy on clean images, the
encoder conditioned at the grid point nearest 0 (N = 81), no pre-trained
weights, every parameter trained, no layer decay; 4 epochs of 54,000 images
(train[:90%]), batch 128, base lr 2e-3 (× 128/256) with a one-epoch warm-up
then cosine. DDS denoises each noisy copy first and classifies the result with
this classifier (`configs/fashion_mnist_dds_certify.py`), so it never sees
noise; `config.sigma` is not used in training (the evaluation still reports
accuracies on noisy inputs, which show why a plain classifier needs the denoiser).
"""
from configs import common


def get_config(arg=None):
  common.parse_arg(arg)
  config = common.demo_finetune_config(0.25)
  config.task = "clean"
  config.init_from = None
  config.train_head = True
  config.optim.layer_decay = 1.0     # nothing pre-trained to protect
  config.epochs = 4
  return config
