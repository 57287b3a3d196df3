r"""Paper rows: certify the ImageNet classifiers of configs/imagenet_finetune.py:sigma=SIGMA.

  python -m rrcm_jax.certify --config=configs/imagenet_certify.py:sigma=0.5 \
      --workdir=gs://BUCKET/rrcm/imagenet_certify \
      --config.init_from=gs://BUCKET/rrcm/imagenet_finetune_0.5

Cohen et al.'s protocol: every 100th ImageNet validation image (500 images),
n0 = 100, n = 100,000, alpha = 0.001; the argument `sigma=` (pixel
space) is one of 0.25, 0.5, 1.0 (required). `--config.subset=first` certifies the first
500 validation images instead (the rRCM authors' code; for a class-sorted
folder that is about ten classes). The authors' PyTorch classifier:
`--config.torch_checkpoint=PATH.pth` instead of init_from (pip install -e
.[torch]). One image costs n forwards of RCM-B at 224 (about 3.5 PFLOP).
"""
from configs import common


def get_config(arg=None):
  sigma = common.check_sigma(common.parse_arg(arg, sigma=(float, common.REQUIRED)).sigma)
  return common.certify_config(common.setup("imagenet_rcmb"), sigma=sigma, every=100,
                               num_images=500, chunk_size=1000, final_norm=True)
