r"""Certify diffusion denoised smoothing (Carlini et al. 2023) on Fashion-MNIST.

  python -m rrcm_jax.certify --config=configs/fashion_mnist_dds_certify.py \
      --workdir=workdirs/fmnist/dds_certify \
      --config.dds.denoiser=workdirs/fmnist/diffusion \
      --config.dds.classifier=workdirs/fmnist/clean_classifier --config.sigma=0.25 --config.n=10000

The base classifier denoises each noisy copy in one step with the U-Net of a
`python -m rrcm_jax.diffusion` workdir (configs/fashion_mnist_diffusion.py,
its EMA weights) at DDS's t*, then classifies x̂0 with an rrcm-jax classifier
at its clean grid point (configs/fashion_mnist_clean_classifier.py, or any
fine-tuning workdir of the same data: `--config.checkpoint` picks last or
best_*). CERTIFY with n0 = 100, n = 100,000 (the paper's), alpha = 0.001, on
every 100th test image (100 images); `chunk_size` 32 suits a CPU (the
Fashion-MNIST run: 140-190 noisy samples/s against 64 at 128, 2 shared cores). sigma is
pixel space; the log's .json records t* and `sigma_added`, the pixel-space
noise x_t carries. Argument: `sigma=` (default 0.25).
"""
from configs import common


def get_config(arg=None):
  sigma = common.check_sigma(common.parse_arg(arg, sigma=0.25).sigma)
  config = common.certify_config(common.setup("fashion_mnist"), sigma=sigma, every=100,
                                 num_images=100, chunk_size=32, final_norm=False)
  config.method = "dds"
  return config
