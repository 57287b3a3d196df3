r"""Certify diffusion denoised smoothing on CIFAR-10 with the public models of Carlini et al. 2023.

  python -m rrcm_jax.certify --config=configs/cifar10_dds_certify.py:sigma=0.25 \
      --workdir=W/dds-certify-cifar10 \
      --config.dds.denoiser=cifar10_uncond_50M_500K.pt \
      --config.dds.classifier_checkpoint=vit-cifar10/model.safetensors

Denoiser: improved-diffusion's `cifar10_uncond_50M_500K.pt` (cosine schedule,
4,000 steps, learned variance; preset `cifar10_uncond_50M_500K`, read with
torch). Classifier: `hf_vit_b16_cifar10`, the Hugging Face ViT-B/16
`aaraki/vit-base-patch16-224-in21k-finetuned-cifar10` at 224 (x̂0 is
resized 32 -> 224, bicubic, antialiased). Cohen et al.'s protocol: every
20th test image (500 images), n0 = 100, n = 100,000, alpha = 0.001; the
argument `sigma=` (pixel space) is one of 0.25, 0.5, 1.0 (required).
"""
from configs import common


def get_config(arg=None):
  sigma = common.check_sigma(common.parse_arg(arg, sigma=(float, common.REQUIRED)).sigma)
  config = common.certify_config(common.setup("cifar10_rcmb"), sigma=sigma, every=20,
                                 num_images=500, chunk_size=1000, final_norm=False)
  config.method = "dds"
  config.dds = common.dds_section(denoiser_preset="cifar10_uncond_50M_500K",
                                  classifier="hf_vit_b16_cifar10")
  return config
