r"""Paper rows: certify the CIFAR-10 classifiers of configs/cifar10_finetune.py:sigma=SIGMA.

  python -m rrcm_jax.certify --config=configs/cifar10_certify.py:sigma=0.25 \
      --workdir=gs://BUCKET/rrcm/cifar10_certify \
      --config.init_from=gs://BUCKET/rrcm/cifar10_finetune_0.25

Cohen et al.'s protocol: every 20th CIFAR-10 test image (500 images), n0 =
100, n = 100,000, alpha = 0.001; the argument `sigma=` (pixel space) is one
of 0.25, 0.5, 1.0 (required). `--config.subset=first` certifies the first 500
test images instead (the rRCM authors' code); results state which was used.
Logs <workdir>/certify_sigma<sigma>.tsv, so the three sigmas can share one
workdir and `python -m rrcm_jax.report` draws them together.
"""
from configs import common


def get_config(arg=None):
  sigma = common.check_sigma(common.parse_arg(arg, sigma=(float, common.REQUIRED)).sigma)
  return common.certify_config(common.setup("cifar10_rcmb"), sigma=sigma, every=20,
                               num_images=500, chunk_size=1000, final_norm=False)
