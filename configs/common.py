"""Shared defaults for every rrcm-jax experiment config.

A config is an experiment: each file under `configs/` builds on these
sections and sets what its row of the paper (docs/method.md) says. Every key can be
overridden on the command line as `--config.a.b=v`.

Quantities derived from `total_steps` (learning-rate warm-up, target-EMA
decay steps, the icm schedule's horizon) are `FieldReference`s: overriding
`--config.total_steps=N` carries them along unless they are set explicitly.
"""
import ml_collections

FieldReference = ml_collections.FieldReference


def data_config(name="fashion_mnist", image_size=28, channels=1, num_classes=10):
  """Where images come from. Pixels leave the pipeline as uint8 in [0, 255]."""
  return ml_collections.ConfigDict(dict(
      name=name,              # a TFDS name, "folder" (train/ val/ class folders) or "synthetic"
      data_dir=ml_collections.FieldReference(None, field_type=str),   # TFDS data_dir
      folder=ml_collections.FieldReference(None, field_type=str),     # root of train/ val/ (name="folder")
      train_split="train",
      eval_split="test",
      image_size=image_size,  # side of the square images the model sees
      channels=channels,
      num_classes=num_classes,
      shuffle_buffer=10_000,
      cache=True,             # cache decoded images in memory (small datasets)
      # pre-training: (min, max) area fraction of the two augmented views' random resized
      # crops, the augmentation strength (docs/method.md: RandomResizedCrop's default (0.08, 1.0))
      pretrain_crop_scale=(0.08, 1.0),
  ))


def model_config(width=192, depth=6, num_heads=3, patch_size=4, image_size=32,
                 channels=3, proj_hidden=2048, proj_out=256):
  """The ViT encoder with its time token and projection head (docs/method.md, Encoder)."""
  return ml_collections.ConfigDict(dict(
      image_size=image_size,
      channels=channels,
      patch_size=patch_size,
      width=width,
      depth=depth,
      num_heads=num_heads,
      mlp_ratio=4,
      proj_hidden=proj_hidden,
      proj_out=proj_out,
      time_mlp=False,           # optional D -> 4D -> D MLP on the time embedding (off in the paper)
      frozen_patch_embed=False,  # ImageNet configs: MoCo-v3 trick
      init="vit",               # "vit" (trunc-normal 0.02) or "mocov3" (xavier-uniform, ImageNet)
      dtype="float32",          # compute dtype: "float32" or "bfloat16" (params stay float32)
      remat=False,              # jax.checkpoint per block (large configs)
      # jax.nn.dot_product_attention implementation: None (XLA's choice), "xla" or "cudnn"
      # (fused, GPU; +27 % sampler throughput for RCM-B in bfloat16 on an H200).
      attention=ml_collections.FieldReference(None, field_type=str),
  ))


def denoiser_config():
  """Karras grid and preconditioning constants (docs/method.md, Noise-level grid)."""
  return ml_collections.ConfigDict(dict(
      sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5))


def pretrain_config(total_steps, batch_size, lr, weight_decay, warmup_divisor,
                    ema_rate, target_ema_A):
  """Everything `rrcm_jax.pretrain` reads, with the defaults of docs/method.md.

  `warmup_divisor`: warm-up = total_steps // warmup_divisor (30 for CIFAR-10:
  10k of 300k; 40 for ImageNet RCM-B: 15k of 600k; 60 for RCM-S: 10k of 600k).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = FieldReference(total_steps)
  steps = config.get_ref("total_steps")
  config.batch_size = batch_size          # global batch, over all devices and hosts
  config.optim = ml_collections.ConfigDict(dict(
      lr=lr, weight_decay=weight_decay, b1=0.9, b2=0.999,
      warmup_steps=steps // warmup_divisor,
      grad_clip=2.0,                      # applied only after warm-up
  ))
  config.scales = ml_collections.ConfigDict(dict(
      # "icm" doubling (docs/method.md, Number of scales during pre-training)
      start=20, end=80, total_steps=steps))
  config.target_ema = ml_collections.ConfigDict(dict(
      start=0.99, end=0.9999, A=float(target_ema_A), decay_steps=steps))
  config.ema_rate = ema_rate              # the separately kept "EMA model"
  config.temperature = 0.2                # InfoNCE τ
  config.denoiser = denoiser_config()
  config.mesh = ml_collections.ConfigDict(dict(
      fsdp=False,             # shard parameters and optimizer state over "data" too
      fsdp_min_size=2 ** 14,  # arrays smaller than this stay replicated
  ))
  config.log_every = 50
  config.save_every = 10_000              # kept checkpoints
  config.latest_every = 1_000             # the frequent "latest" checkpoint (only the newest kept)
  return config
