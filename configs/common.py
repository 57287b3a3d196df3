"""Shared defaults for every rrcm-jax experiment config.

A config is an experiment: each file under `configs/` builds on the sections
and stage builders here (and on nothing else under `configs/`) and sets what
its row of the paper (docs/method.md) says. Every key can be overridden on the
command line as `--config.a.b=v`; the config's own argument follows
big_vision's grammar, `--config=configs/x.py:sigma=0.5,quick=True`, parsed by
`parse_arg`.

Quantities derived from `total_steps` (learning-rate warm-up, target-EMA
decay steps, the icm schedule's horizon) are `FieldReference`s: overriding
`--config.total_steps=N` carries them along unless they are set explicitly.
"""
import ml_collections

FieldReference = ml_collections.FieldReference
SIGMAS = (0.25, 0.5, 1.0)   # certification noise levels of the paper, pixel space


class _Required:
  def __repr__(self):
    return "REQUIRED"


REQUIRED = _Required()   # a `parse_arg` default: the key must be given
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _convert(name, text, typ):
  if typ is bool:
    if text.lower() not in _BOOLS:
      raise ValueError(f"the config argument {name}={text!r} must be True or False.")
    return _BOOLS[text.lower()]
  try:
    return typ(text)
  except ValueError:
    raise ValueError(f"the config argument {name}={text!r} must be of type "
                     f"{typ.__name__}.") from None


def parse_arg(arg, **spec):
  """A config's argument, big_vision's grammar: "key=value,key=value" -> ConfigDict.

  `spec` names every key the config accepts: `name=default` (the value's type
  is the default's) or `name=(type, default)`; `REQUIRED` as the default makes
  the key mandatory. A bool key may be given bare ("quick" = "quick=True").
  Unknown or missing keys and unconvertible values raise one ValueError.
  """
  spec = {k: v if isinstance(v, tuple) else (type(v), v) for k, v in spec.items()}
  given = {}
  for item in (arg or "").split(","):
    if not item:
      continue
    key, has_value, text = item.partition("=")
    if key not in spec:
      raise ValueError(f"the config argument {item!r} is not one of the accepted keys "
                       f"{sorted(spec)} (write key=value,key=value).")
    if not has_value and spec[key][0] is not bool:
      raise ValueError(f"the config argument {item!r} needs a value: {key}=VALUE.")
    given[key] = _convert(key, text if has_value else "True", spec[key][0])
  missing = [k for k, (_, default) in spec.items() if default is REQUIRED and k not in given]
  if missing:
    raise ValueError(f"the config argument must set {', '.join(missing)} "
                     f"(e.g. {missing[0]}=VALUE), got {arg!r}.")
  return ml_collections.ConfigDict({k: given.get(k, default) for k, (_, default) in spec.items()})


def check_sigma(sigma, allowed=SIGMAS):
  """σ (pixel space) if it is one of `allowed`, else one sentence."""
  if sigma not in allowed:
    raise ValueError(f"the config argument sigma must be one of {allowed}, got {sigma!r}.")
  return float(sigma)


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
      # Input path: "device" (rrcm_jax.data.device: the whole dataset on the accelerators,
      # batches and augmentations built there; no TensorFlow) or "tfdata" (tf.data). None:
      # "device" for the in-memory datasets fashion_mnist, mnist, cifar10 (<= 2 GB,
      # rrcm_jax.data.device.DEVICE_DATASETS) and whenever `arrays` is set, else "tfdata"
      # (ImageNet, class folders, synthetic, and fine-tuning with augment="autoaug").
      pipeline=ml_collections.FieldReference(None, field_type=str),
      # pipeline="device": an IDX folder, a cifar-10-batches-py / cifar-100-python folder or
      # an .npz (x_<split>, y_<split>); None: the dataset's standard place (Fashion-MNIST:
      # /usr/share/datasets/fashion-mnist, else TFDS).
      arrays=ml_collections.FieldReference(None, field_type=str),
  ))


_OPTIONAL_STR = ("data_dir", "folder", "pipeline", "arrays")   # None-able str keys of data_config


def copy_data(data):
  """A copy of a data section whose unset optional paths stay overridable on the command
  line (`copy_and_resolve_references` turns their typed None into an untyped one)."""
  data = data.copy_and_resolve_references()
  for key in _OPTIONAL_STR:
    if key in data and data[key] is None:
      data[key] = ml_collections.FieldReference(None, field_type=str)
  return data


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
      lr=lr, weight_decay=weight_decay, b1=0.9, b2=0.999, eps=1e-8,
      # "all": weight decay on every parameter (the reference's pre-training);
      # "vit": none on biases, norms, pos_embed and cls_token.
      weight_decay_on="all",
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
  # k-NN representation monitor (rrcm_jax/evaluators/knn_monitor.py): every knn_every steps
  # (0: off) the online and EMA encoders' weighted k-NN accuracy, clean and at model-space
  # noise `levels`, bank = bank_split's clean features, queries = query_split.
  config.knn_every = 0
  config.knn = ml_collections.ConfigDict(dict(
      bank_split="train[:10000]", query_split="test[:2000]", levels=(0.0, 0.5, 1.0),
      k=20, temperature=0.07, batch_size=500, feature="feature"))
  config.log_every = 50
  # Profiling (README, "Progress and profiling"): profile_steps > 0 traces the steps after the
  # first profile_start into <workdir>/plugins/profile (TensorBoard's profile tab); 0: off.
  config.profile_start = 10
  config.profile_steps = 0
  config.save_every = 10_000              # kept checkpoints
  config.latest_every = 1_000             # the frequent "latest" checkpoint (only the newest kept)
  config.estimate = False                 # True: time a few steps, print the run's cost, write nothing
  # A resumed run stops when its model, batch_size, seed, optim or total_steps differ from the
  # workdir's config.json, unless named here ("total_steps,optim.lr"; README, Reliability).
  config.allow_changes = ""
  return config


# ----------------------------------------------------------------------------
# Named setups: the data and model sections a pre-training config fixes and
# that fine-tuning and certification must share (a checkpoint fits only them).
# ----------------------------------------------------------------------------
SETUPS = ("fashion_mnist", "cifar10_rcmb", "imagenet_rcmb", "imagenet_rcms")


def _imagenet_data():
  data = data_config("imagenet2012", image_size=224, channels=3, num_classes=1000)
  data.eval_split = "validation"
  data.cache = False
  return data


def _paper_model(width, depth, num_heads, patch_size, image_size, proj_hidden, imagenet):
  model = model_config(width=width, depth=depth, num_heads=num_heads, patch_size=patch_size,
                       image_size=image_size, channels=3, proj_hidden=proj_hidden)
  model.frozen_patch_embed = imagenet   # MoCo-v3 trick (ImageNet rows only)
  model.init = "mocov3" if imagenet else "vit"
  model.dtype = "bfloat16"              # the reference trains in fp16 autocast
  return model


def setup(name):
  """ConfigDict(data, model, denoiser) of a named setup (`SETUPS`).

  fashion_mnist: 28×28 grayscale, patch 7 (18 tokens), width 64, depth 4,
  4 heads, projection 256 -> 64 (the demo). The others are the paper's rows
  (docs/method.md, Encoder and Pre-training objective, "Paper configs").
  """
  if name == "fashion_mnist":
    data = data_config("fashion_mnist", image_size=28, channels=1, num_classes=10)
    model = model_config(width=64, depth=4, num_heads=4, patch_size=7, image_size=28,
                         channels=1, proj_hidden=256, proj_out=64)
  elif name == "cifar10_rcmb":
    data = data_config("cifar10", image_size=32, channels=3, num_classes=10)
    data.shuffle_buffer = 50_000
    model = _paper_model(768, 12, 12, patch_size=4, image_size=32, proj_hidden=2048,
                         imagenet=False)
  elif name == "imagenet_rcmb":
    data = _imagenet_data()
    model = _paper_model(768, 12, 12, patch_size=16, image_size=224, proj_hidden=4096,
                         imagenet=True)
  elif name == "imagenet_rcms":
    data = _imagenet_data()
    model = _paper_model(512, 6, 8, patch_size=16, image_size=224, proj_hidden=2048,
                         imagenet=True)
  else:
    raise ValueError(f"setup {name!r} is not one of {SETUPS}.")
  return ml_collections.ConfigDict(dict(data=data, model=model, denoiser=denoiser_config()))


# ----------------------------------------------------------------------------
# Fine-tuning and certification.
# ----------------------------------------------------------------------------
def finetune_config(base, *, sigma, epochs, warmup_epochs, batch_size, lr, layer_decay,
                    weight_decay=0.0):
  """Everything `rrcm_jax.finetune` reads (docs/method.md, Fine-tuning).

  The data, model and denoiser sections are copied from `base` (a `setup` or
  the pre-training config), so that the pre-training checkpoint fits.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = "consistency"           # "consistency", "finetune" (Gaussian noise) or "linear"
  config.sigma = sigma                  # certification noise, pixel space; training adds 2σ
  config.init_from = FieldReference(None, field_type=str)   # pre-training (or linear-probe) workdir
  # "ema" (default; the reference leaves it open), "online", "target", or "ema_debiased" (the
  # EMA bias-corrected for its initialization: README, "Fine-tuning choices")
  config.init_weights = "ema"
  config.num_scales = FieldReference(None, field_type=int)  # N; None: the checkpoint's (81 from scratch)
  config.train_head = False             # consistency task: the reference leaves the head out
  config.final_norm = False             # final LayerNorm before the head (ImageNet: on)
  config.consistency = ml_collections.ConfigDict(dict(
      draws=2,
      lam=FieldReference(None, field_type=float),   # None: 10 for σ <= 0.25, else 20
      eta=0.5))
  config.entropy_weight = 1.0           # "finetune" / "linear": CE + weight · mean entropy
  config.augment = "none"               # "none", "weak", "strong", "autoaug" (data.augment)
  config.mixup = 0.0                    # mixup alpha (0: off)
  config.cutmix = 0.0                   # cutmix alpha (0: off)
  config.mixup_switch_prob = 0.5
  config.label_smoothing = 0.0
  config.epochs = epochs
  config.steps_per_epoch = FieldReference(None, field_type=int)  # None: train examples // batch
  config.batch_size = batch_size        # global
  config.eval_batch_size = 1024
  config.optim = ml_collections.ConfigDict(dict(
      lr=lr,                            # base rate: × batch_size / 256
      weight_decay=weight_decay, b1=0.9, b2=0.999,
      warmup_epochs=warmup_epochs,
      layer_decay=layer_decay,          # BEiT layer-wise lr decay
      per_epoch_lr=True,                # lr constant within an epoch (reference; epoch 0 at lr 0)
  ))
  config.eval_levels = (0.5, 1.0, 2.0)  # model-space noise levels s of the noisy accuracies
  config.data = copy_data(base.data)
  config.data.train_split = "train[:90%]"
  config.data.val_split = "train[90%:]"   # best checkpoints are chosen here, never on the test split
  config.model = base.model.copy_and_resolve_references()
  config.model.frozen_patch_embed = False  # fine-tuning trains the patch embedding (layer 0)
  config.denoiser = base.denoiser.copy_and_resolve_references()
  config.mesh = ml_collections.ConfigDict(dict(fsdp=False))
  config.log_every = 50
  # Profiling (README, "Progress and profiling"): profile_steps > 0 traces the steps after the
  # first profile_start into <workdir>/plugins/profile (TensorBoard's profile tab); 0: off.
  config.profile_start = 10
  config.profile_steps = 0
  config.latest_every = 500
  # A resumed run stops when model, batch_size, seed, optim, epochs, task or sigma differ
  # from the workdir's config.json, unless named here ("epochs"; README, Reliability).
  config.allow_changes = ""
  return config


def certify_config(base, *, sigma, every, num_images, chunk_size=1000, final_norm=None):
  """Everything `rrcm_jax.certify` reads (docs/method.md, Certification).

  The data, model and denoiser sections come from `base`: the fine-tuning
  config, or the `setup` it was built on (a checkpoint must match them).
  `final_norm`: None takes the fine-tuning config's.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0                       # noise of sample j of image i: key(seed) with i, stream, j
  # "rrcm": the classifier below sees x + σε; "dds": diffusion denoised smoothing, the
  # denoiser and classifier of config.dds (docs/method.md, "Diffusion denoised smoothing").
  config.method = "rrcm"
  config.dds = dds_section()
  # The classifier: a fine-tuning workdir, or the authors' PyTorch checkpoint.
  config.init_from = FieldReference(None, field_type=str)        # fine-tuning workdir
  config.checkpoint = "last"            # "last", or "best_clean", "best_noisy_0.5", ...
  config.torch_checkpoint = FieldReference(None, field_type=str)  # or a .pth (needs torch)
  config.torch_network = FieldReference(None, field_type=str)     # its network; None: first known
  config.torch_trusted = False          # unpickle arbitrary objects (only files you trust)
  config.num_scales = FieldReference(None, field_type=int)  # N; None: init_from's, 81 for a .pth
  # used for a .pth only (init_from records its own)
  config.final_norm = base.final_norm if final_norm is None else final_norm
  config.dtype = FieldReference(None, field_type=str)  # compute dtype; None: the classifier's
  config.sigma = float(sigma)           # pixel-space noise std
  config.mode = "certify"               # "certify" or "predict"
  config.n0 = 100                       # selection samples (CERTIFY)
  config.n = 100_000                    # estimation samples (PREDICT: all its samples)
  config.alpha = 0.001
  config.chunk_size = chunk_size        # noisy samples per call (rounded up to the local devices)
  config.estimate = False               # True: time a few chunks, print the run's cost, write nothing
  # Which test images: every k-th (Cohen et al.) or the first num_images (the rRCM code).
  config.subset = "every"               # "every" or "first"
  config.every = every
  config.num_images = num_images        # at most this many of the subset
  config.data = copy_data(base.data)   # data.eval_split is certified
  config.model = base.model.copy_and_resolve_references()
  config.model.frozen_patch_embed = False   # as fine-tuning left it
  config.denoiser = base.denoiser.copy_and_resolve_references()
  return config


# ----------------------------------------------------------------------------
# The Fashion-MNIST demo (README's first command), shared by its fine-tuning,
# certification and from-scratch baseline configs.
# ----------------------------------------------------------------------------
def demo_pretrain_config():
  """Pre-training of the `fashion_mnist` setup: 2,000 steps of 64 images."""
  config = pretrain_config(total_steps=2000, batch_size=64, lr=1e-3, weight_decay=0.0,
                           warmup_divisor=20, ema_rate=0.999, target_ema_A=15)
  config.update(setup("fashion_mnist"))
  config.log_every = 50
  config.latest_every = 200
  config.save_every = 1000
  # k-NN monitor (README, "Pre-training"): 32k encoder forwards per evaluation, about the
  # compute of 30 training steps, so ~10 % of the run at every 250 steps.
  config.knn_every = 250
  return config


def demo_finetune_config(sigma):
  """Consistency fine-tuning of the demo: 2 epochs, batch 128, base lr 2e-3, head trained.

  A per-step warm-up + cosine (2 epochs: a per-epoch curve would spend one at
  lr 0), and the head trained: frozen at its 2e-5 initialization the small
  encoder did not learn in this budget (validation accuracy 15 % after 2
  epochs against 65 % trained; `--config.train_head=False` reproduces it).
  """
  config = finetune_config(setup("fashion_mnist"), sigma=sigma, epochs=2, warmup_epochs=1,
                           batch_size=128, lr=2e-3, layer_decay=0.75)
  config.optim.per_epoch_lr = False
  config.train_head = True
  config.eval_batch_size = 1000
  return config


# ----------------------------------------------------------------------------
# Diffusion denoised smoothing (Carlini et al. 2023): the denoiser's training
# and the two models a DDS certification names.
# ----------------------------------------------------------------------------
def dds_section(denoiser_preset=None, classifier=None):
  """config.dds of a certification config (read when config.method is "dds")."""
  return ml_collections.ConfigDict(dict(
      # a `python -m rrcm_jax.diffusion` workdir (its EMA weights), or a public .pt
      denoiser=FieldReference(None, field_type=str),
      # for a .pt: its U-Net and schedule, a name of rrcm_jax.diffusion.dds.DDS_PRESETS
      denoiser_preset=FieldReference(denoiser_preset, field_type=str),
      # an rrcm-jax fine-tuning workdir (called at the clean grid point; config.checkpoint
      # picks last or best_*) or a name of rrcm_jax.pretrained_classifiers.CLASSIFIERS
      classifier=FieldReference(classifier, field_type=str),
      # for a pretrained name: its weights (.safetensors / .bin / .pth)
      classifier_checkpoint=FieldReference(None, field_type=str),
  ))


def diffusion_config(data, unet, schedule, *, total_steps, batch_size, lr, warmup_steps,
                     ema_rate):
  """Everything `python -m rrcm_jax.diffusion` reads: ε-prediction DDPM training.

  `unet`: the U-Net's constructor arguments (`diffusion.unet.UNET_PRESETS`);
  `schedule`: noise_schedule, num_steps, rescale_timesteps (`dds.DDS_PRESETS`).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = FieldReference(total_steps)
  config.batch_size = batch_size          # global
  config.augment = "weak"                 # horizontal flips ("none", "weak", "strong")
  config.optim = ml_collections.ConfigDict(dict(
      lr=lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
      warmup_steps=warmup_steps,
      decay="constant",                   # after warm-up: "constant" or "cosine" (to 0)
  ))
  config.ema_rate = ema_rate              # the EMA weights that denoising uses (debiased)
  config.allow_changes = ""               # binding keys a resumed run may change ("total_steps")
  config.diffusion = ml_collections.ConfigDict(dict(
      noise_schedule=schedule["noise_schedule"], num_steps=schedule["num_steps"],
      rescale_timesteps=schedule["rescale_timesteps"]))
  config.unet = ml_collections.ConfigDict(dict(unet, dtype="float32"))
  config.data = copy_data(data)   # data.arrays / pipeline stay overridable
  # data.pipeline None: "device" for the in-memory datasets (Fashion-MNIST, MNIST, CIFAR), else
  # "tfdata" (rrcm_jax.diffusion.__main__); set it to force one
  config.mesh = ml_collections.ConfigDict(dict(fsdp=False))
  config.log_every = 50
  # Profiling (README, "Progress and profiling"): profile_steps > 0 traces the steps after the
  # first profile_start into <workdir>/plugins/profile (TensorBoard's profile tab); 0: off.
  config.profile_start = 10
  config.profile_steps = 0
  config.save_every = 10_000
  config.latest_every = 250
  return config
