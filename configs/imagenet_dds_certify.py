r"""Certify diffusion denoised smoothing on ImageNet with the public models of Carlini et al. 2023.

  python -m rrcm_jax.certify --config=configs/imagenet_dds_certify.py:sigma=0.5 \
      --workdir=W/dds-certify-imagenet \
      --config.dds.denoiser=256x256_diffusion_uncond.pt \
      --config.dds.classifier_checkpoint=beit-large-512/model.safetensors

Denoiser: guided-diffusion's `256x256_diffusion_uncond.pt` (linear schedule,
1,000 steps, learned variance; preset `256x256_diffusion_uncond`, read with
torch), applied to the 224×224 validation crops as DDS does. Classifier:
`beit_large_patch16_512`, timm's `beit_large_patch16_512.in22k_ft_in22k_in1k`
(x̂0 resized 224 -> 512, bicubic, antialiased). Every 100th validation image
(500 images), n0 = 100, n = 100,000, alpha = 0.001; the argument `sigma=` is
one of 0.25, 0.5, 1.0 (required). One noisy sample costs about 2.4 TFLOP
(benchmarks/README.md, "Inference cost: rRCM vs DDS"): this is an accelerator job.
"""
from configs import common


def get_config(arg=None):
  sigma = common.check_sigma(common.parse_arg(arg, sigma=(float, common.REQUIRED)).sigma)
  config = common.certify_config(common.setup("imagenet_rcmb"), sigma=sigma, every=100,
                                 num_images=500, chunk_size=64, final_norm=True)
  config.method = "dds"
  config.dds = common.dds_section(denoiser_preset="256x256_diffusion_uncond",
                                  classifier="beit_large_patch16_512")
  return config
