r"""Certify the Fashion-MNIST classifier of configs/fashion_mnist_finetune.py.

  python -m rrcm_jax.certify --config=configs/fashion_mnist_certify.py \
      --workdir=workdirs/fmnist/certify --config.init_from=workdirs/fmnist/finetune \
      --config.sigma=0.25 --config.n=10000

CERTIFY (Cohen et al. 2019) with n0 = 100, n = 100,000 (the paper's; the
README demo uses 2,000), alpha = 0.001, on every 100th test image (100
images). sigma is the pixel-space noise std ([0, 1] images); the classifier
sees 2 * sigma in model space. The log is <workdir>/certify_sigma<sigma>.tsv
(`--config.mode=predict`: predict_sigma<sigma>.tsv), its report table the
.md beside it. Argument: `sigma=` (default 0.25).
"""
from configs import common


def get_config(arg=None):
  sigma = common.check_sigma(common.parse_arg(arg, sigma=0.25).sigma)
  return common.certify_config(common.demo_finetune_config(sigma), sigma=sigma, every=100,
                               num_images=100)
