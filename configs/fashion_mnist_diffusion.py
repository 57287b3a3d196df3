r"""The DDS denoiser for Fashion-MNIST: ε-prediction DDPM training of a small U-Net.

  python -m rrcm_jax.diffusion --config=configs/fashion_mnist_diffusion.py \
      --workdir=workdirs/fmnist/diffusion

Preset `fashion_mnist_tiny` (`rrcm_jax.diffusion.unet.UNET_PRESETS`: 16
channels at 28 px, 32 at 14 and 7, attention at 7 px, GroupNorm with 8
groups, 0.30 M parameters, 0.09 GFLOP per forward), cosine schedule of 1,000
steps (`dds.DDS_PRESETS`), ε only (no learned variance). Clean training
images with horizontal flips, batch 64, AdamW lr 1e-3 after 100 warm-up
steps, constant; EMA rate 0.995 (a short run: 0.999 would still hold a fifth
of the initial weights after 1,500 steps). 3,000 steps by default (about
3 epochs); `--config.total_steps` changes it. The argument `preset=`
picks another U-Net of UNET_PRESETS of the same image size and channels
(`preset=fashion_mnist_small`: 1.19 M parameters, 0.37 GFLOP).
"""
from configs import common
from rrcm_jax.diffusion import dds, unet


def get_config(arg=None):
  preset = common.parse_arg(arg, preset="fashion_mnist_tiny").preset
  if preset not in dds.DDS_PRESETS or dds.DDS_PRESETS[preset]["image_size"] != 28:
    raise ValueError(f"the config argument preset must be a 28-pixel DDS preset, one of "
                     f"{sorted(k for k, v in dds.DDS_PRESETS.items() if v['image_size'] == 28)}, "
                     f"got {preset!r}.")
  config = common.diffusion_config(
      common.data_config("fashion_mnist", image_size=28, channels=1, num_classes=10),
      unet.UNET_PRESETS[preset], dds.DDS_PRESETS[preset], total_steps=3000, batch_size=64,
      lr=1e-3, warmup_steps=100, ema_rate=0.995)
  config.unet_preset = preset   # recorded with the run (the unet section is what is built)
  return config
