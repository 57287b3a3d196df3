r"""Paper rows: certify the ImageNet classifiers of configs/imagenet_finetune.py:SIGMA.

  python -m rrcm_jax.certify --config=configs/imagenet_certify.py:0.5 \
      --workdir=gs://BUCKET/rrcm/imagenet_certify \
      --config.init_from=gs://BUCKET/rrcm/imagenet_finetune_0.5

Cohen et al.'s protocol: every 100th ImageNet validation image (500 images),
n0 = 100, n = 100,000, alpha = 0.001; sigma (pixel space) is the argument,
one of 0.25, 0.5, 1.0 (required). `--config.subset=first` certifies the first
500 validation images instead (the rRCM authors' code; for a class-sorted
folder that is about ten classes). The authors' PyTorch classifier:
`--config.torch_checkpoint=PATH.pth` instead of init_from (pip install -e
.[torch]). One image costs n forwards of RCM-B at 224 (about 3.5 PFLOP).
"""
from configs import fashion_mnist_certify as base
from configs import fashion_mnist_finetune
from configs import imagenet_finetune


def get_config(arg=None):
  sigma = fashion_mnist_finetune.parse_sigma(arg)
  return base.certify_config(imagenet_finetune.get_config(str(sigma)), sigma=sigma, every=100,
                             num_images=500, chunk_size=1000)
