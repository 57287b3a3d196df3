"""The DDS base classifier a certification config names: a denoiser and a classifier.

docs/method.md, "Diffusion denoised smoothing". `config.method = "dds"`;
`config.dds` names
  denoiser: a `python -m rrcm_jax.diffusion` workdir (its EMA weights, U-Net
    and schedule from its config.json), or a public improved-/guided-diffusion
    `.pt` with `denoiser_preset` (`dds.DDS_PRESETS`: U-Net and schedule);
  classifier: an rrcm-jax fine-tuning workdir (`config.checkpoint` picks last
    or best_*; called at the clean grid point, level 0) or a name of
    `pretrained_classifiers.CLASSIFIERS` with its weights in
    `classifier_checkpoint`.
x̂0 is resized to the classifier's resolution (bicubic, antialiased) when it
differs from the data's. Everything is checked (data size and channels, the
schedule reaching 2σ, class count) before any weight is read; nothing here
writes. σ is pixel space throughout; t* reaches model-space 2σ.
"""
import os

import jax

from rrcm_jax import checkpoints, classifier, models, pretrained_classifiers
from rrcm_jax.diffusion import dds, schedules
from rrcm_jax.diffusion import train as train_lib
from rrcm_jax.diffusion.unet import UNET_PRESETS, UNet

# Data sizes a public denoiser is applied at besides its native one: DDS's ImageNet runs
# denoise the 224×224 center crops with the 256×256 model (its U-Net is convolutional).
EXTRA_SIZES = {"256x256_diffusion_uncond": (224,)}


def _absolute(path):
  return path if "://" in path else os.path.abspath(path)


# ----------------------------------------------------------------------------
# The denoiser.
# ----------------------------------------------------------------------------
def denoiser_spec(config):
  """(UNet, schedule dict, data sizes it serves, record, weight loader) of config.dds.denoiser;
  reads only config.json (a workdir) or nothing (a .pt), no weights."""
  source, preset = config.dds.denoiser, config.dds.denoiser_preset
  dtype = config.dtype or "float32"
  if source is None:
    raise ValueError("config.dds.denoiser must name the denoiser: a `python -m rrcm_jax.diffusion` "
                     "workdir or a public .pt with config.dds.denoiser_preset.")
  if os.path.isfile(source):
    if preset not in dds.DDS_PRESETS:
      raise ValueError(f"config.dds.denoiser_preset={preset!r} must name the U-Net and schedule of "
                       f"{source}, one of {sorted(dds.DDS_PRESETS)}.")
    unet = UNet(**UNET_PRESETS[preset], dtype=dtype)
    schedule = {k: dds.DDS_PRESETS[preset][k]
                for k in ("noise_schedule", "num_steps", "rescale_timesteps")}
    sizes = (dds.DDS_PRESETS[preset]["image_size"],) + EXTRA_SIZES.get(preset, ())
    record = dict(source=_absolute(source), preset=preset, step=None, weights="public .pt")
    return unet, schedule, sizes, record, lambda mesh: _torch_weights(source, unet, config)
  workdir, step = checkpoints.resolve_checkpoint(source, key="config.dds.denoiser")
  saved = checkpoints.read_config(workdir)
  if "unet" not in saved or "diffusion" not in saved:
    raise ValueError(f"config.dds.denoiser={source} is neither a .pt file nor a diffusion "
                     "workdir (its config.json has no unet/diffusion sections).")
  unet_cfg = saved.unet.copy_and_resolve_references()
  unet_cfg.dtype = dtype
  unet = train_lib.build_unet(unet_cfg)
  schedule = dict(saved.diffusion)
  record = dict(source=_absolute(str(workdir)), preset=saved.get("unet_preset"), step=step,
                weights="ema, debiased")
  return unet, schedule, (int(saved.data.image_size),), record, (
      lambda mesh: _workdir_weights(workdir, step, unet, saved, record, mesh))


def _torch_weights(path, unet, config):
  from rrcm_jax import torch_import  # pylint: disable=g-import-not-at-top  (PyTorch only here)
  from rrcm_jax.diffusion import torch_import as unet_import  # pylint: disable=g-import-not-at-top
  try:
    state_dict = torch_import.load_torch_checkpoint(path, trusted=config.torch_trusted)
  except ImportError as e:
    raise ValueError(str(e)) from None
  return unet_import.unet_variables_from_torch(state_dict, unet)


def _workdir_weights(workdir, step, unet, saved, record, mesh):
  """The debiased EMA weights of the diffusion run's checkpoint `step` (None: newest).

  An EMA of rate r started at the initial weights θ0 holds r^k of θ0 after k
  steps (0.995^500 = 8 %: a short run's EMA is still partly the random
  initialization); as Adam's moments it is divided by 1 − r^k after removing
  r^k·θ0, with θ0 recomputed from the run's seed (`train.initial_params`).
  """
  init = train_lib.initial_params(unet, int(saved.data.image_size), int(saved.seed))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = checkpoints.abstract_like(init, jax.tree.map(lambda _: replicated, init))
  state, meta = checkpoints.restore_subtrees(workdir, "checkpoints", {"ema_params": abstract},
                                             step, f"config.dds.denoiser={workdir}")
  k, rate = int(meta["step"]), float(saved.ema_rate)
  record.update(step=k, train_flops=float(meta.get("train_flops", 0.0)), ema_rate=rate,
                ema_init_share=rate ** k)
  return {"params": train_lib.debiased_ema(state["ema_params"], init, rate, k)}


def check_denoiser(config, unet, schedule, sizes, source):
  """One sentence when the denoiser does not fit the data or never reaches 2σ; else DDSStep."""
  data = config.data
  if unet.in_channels != data.channels or data.image_size not in sizes:
    raise ValueError(f"config.dds.denoiser={source} denoises {unet.in_channels}-channel images of "
                     f"size {' or '.join(map(str, sizes))}, but config.data has {data.channels} "
                     f"channel(s) of size {data.image_size}; use a denoiser of the data.")
  try:
    return dds.dds_step(config.sigma, schedule["noise_schedule"], int(schedule["num_steps"]),
                        bool(schedule["rescale_timesteps"]))
  except ValueError:
    largest = schedules.noise_to_signal(schedules.alphas_cumprod(
        schedule["noise_schedule"], int(schedule["num_steps"]))[-1])
    raise ValueError(f"config.dds.denoiser={source}: its {schedule['noise_schedule']} schedule of "
                     f"{schedule['num_steps']} steps reaches model-space noise {largest:.4g}, below "
                     f"2 * config.sigma = {2 * config.sigma}; pick a smaller sigma.") from None


# ----------------------------------------------------------------------------
# The classifier.
# ----------------------------------------------------------------------------
def _check_classes(config, num_classes, channels, source):
  data = config.data
  if num_classes != data.num_classes or channels != data.channels:
    raise ValueError(f"config.dds.classifier={source} classifies {channels}-channel images into "
                     f"{num_classes} classes, but config.data has {data.channels} channel(s) and "
                     f"{data.num_classes} classes; use a classifier of the data.")


def classifier_spec(config):
  """(resolution, record, loader mesh -> (classifier_fn(params, x̂0 model space), params)):
  checks and the record first, weights only when the loader is called."""
  name = config.dds.classifier
  if name is None:
    raise ValueError("config.dds.classifier must name the classifier: an rrcm-jax fine-tuning "
                     f"workdir or one of {sorted(pretrained_classifiers.CLASSIFIERS)}.")
  if name in pretrained_classifiers.CLASSIFIERS:
    clf = pretrained_classifiers.pretrained_classifier(name, config.dtype or "float32")
    _check_classes(config, clf.num_classes, 3, name)
    path = config.dds.classifier_checkpoint
    if path is None or not os.path.isfile(path):
      raise ValueError(f"config.dds.classifier_checkpoint={path!r} must be the file of {name}'s "
                       f"weights (published as {clf.checkpoint}).")
    record = dict(source=name, checkpoint=_absolute(path), step=None,
                  dtype=config.dtype or "float32", hub=clf.checkpoint)

    def load(mesh):
      del mesh
      params = clf.load(path, trusted=config.torch_trusted)
      return (lambda p, x: clf.apply(p, (x + 1) / 2)), params   # x̂0 model space -> pixels
    return clf.preprocess.resolution, record, load
  workdir, _ = checkpoints.resolve_checkpoint(name, key="config.dds.classifier")
  saved = checkpoints.read_config(workdir)
  if "task" not in saved:
    raise ValueError(f"config.dds.classifier={name} is neither a pretrained classifier name "
                     f"({sorted(pretrained_classifiers.CLASSIFIERS)}) nor a fine-tuning workdir.")
  _check_classes(config, int(saved.data.num_classes), int(saved.model.channels), name)
  record = dict(source=_absolute(str(workdir)), checkpoint=config.checkpoint, task=saved.task,
                dtype=config.dtype or saved.model.dtype)

  def load(mesh):
    model, params, info = classifier.load_classifier(workdir, config.checkpoint, mesh)
    if config.dtype and config.dtype != info["model"].dtype:
      model_cfg = info["model"].copy_and_resolve_references()
      model_cfg.dtype = config.dtype
      model = models.classifier(model_cfg, info["num_classes"], info["final_norm"])
    record.update(step=info["step"], num_scales=info["num_scales"],
                  train_flops=info["train_flops"])
    predict = classifier.level_logits_fn(model, info["num_scales"], info["denoiser"])
    return (lambda p, x: predict(p, x, 0.0)), params   # the clean grid point
  return int(saved.model.image_size), record, load


# ----------------------------------------------------------------------------
# Both: what certification samples.
# ----------------------------------------------------------------------------
def load(config, mesh):
  """(logits_fn(params, x, eps) for `Sampler(logits_input="clean_and_noise")`, params
  {"denoiser", "classifier"}, num_classes, record) for a DDS certification config.

  record: method, denoiser {source, preset, step, weights}, classifier {source,
  checkpoint, step, dtype, ...}, t_star, t_in, sigma (nominal, used by the radius)
  and sigma_added (the pixel-space noise std x_t carries, >= sigma).
  """
  unet, schedule, sizes, den_record, load_unet = denoiser_spec(config)
  step = check_denoiser(config, unet, schedule, sizes, config.dds.denoiser)
  size, clf_record, load_classifier = classifier_spec(config)
  clf_fn, clf_params = load_classifier(mesh)
  params = dict(denoiser=load_unet(mesh), classifier=clf_params)
  logits_fn = dds.make_logits_fn(unet, clf_fn, step,
                                 None if size == config.data.image_size else size)
  record = dict(method="dds", denoiser=den_record, classifier=clf_record,
                schedule=dict(schedule), t_star=step.t, t_in=step.t_in,
                sigma=float(config.sigma), sigma_added=step.sigma_added,
                classifier_resolution=size)
  return logits_fn, params, config.data.num_classes, record
