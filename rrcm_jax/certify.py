r"""Certification: randomized smoothing of a fine-tuned classifier, one Cohen-format line per image.

  python -m rrcm_jax.certify --config=configs/fashion_mnist_certify.py \
      --workdir=workdirs/fmnist/certify --config.init_from=workdirs/fmnist/finetune \
      --config.sigma=0.25 --config.n=10000 --config.num_images=100

The classifier is a fine-tuning workdir's checkpoint (`config.checkpoint`:
"last" or a best_* one) or the authors' PyTorch classifier
(`config.torch_checkpoint=PATH.pth`). The log <workdir>/<mode>_sigma<sigma>.tsv
(`log_path`) gets one flushed line per image; a restart skips the images
already logged and never truncates the log. The settings it was made with
(classifier, sigma, n0, n, alpha, seed, images) are kept beside it in .json,
and a restart with other settings stops with one sentence. They also record
`inference_flops_per_sample` (`inference_flops`: what one noisy sample costs;
the log's `time` column holds the measured seconds per image), which a
restart does not compare. At the end the
report table (`rrcm_jax.report`) is printed and written beside the log (.md).

Several processes (jax.distributed, `parallel.initialize_distributed`): image
k of the subset goes to process k % P, which samples on a mesh of its local
devices and writes <log>.p<k>; process 0 merges the parts. The noise of test
image i is keyed by i itself (`smoothing.Sampler`), so the log does not
depend on the number of processes, devices or the chunk size.

Units: sigma is the pixel-space noise std for images in [0, 1]; the
classifier sees (x + sigma * eps - 0.5) / 0.5, model-space std 2 * sigma, and
is conditioned at the grid point nearest 2 * sigma. Radii are pixel-space L2.

`config.method = "dds"`: diffusion denoised smoothing (Carlini et al. 2023;
configs/<dataset>_dds_certify.py). The base classifier is a denoiser and a
classifier (`config.dds`, `rrcm_jax.diffusion.base_classifier`): the sampler
hands it the clean image and each sample's ε ("clean_and_noise"), it forms
x_t at DDS's t*, denoises in one step and classifies. The log's .json
records both models, t* and `sigma_added`, the pixel-space noise x_t
actually carries (>= sigma); radii use the nominal sigma.
"""
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
from etils import epath
from jax.experimental import multihost_utils

from rrcm_jax import certlog, classifier, flops, models, parallel, report, smoothing
from rrcm_jax.diffusion import base_classifier
from rrcm_jax.diffusion import train as diffusion_train
from rrcm_jax import workdir as workdir_lib

MODES = ("certify", "predict")
METHODS = ("rrcm", "dds")
SUBSETS = ("every", "first")
DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------
# Config checks: before anything is loaded, compiled or written.
# ----------------------------------------------------------------------------
def validate_config(config):
  """Raises ValueError with one sentence naming the bad key and what is allowed."""
  sigma = config.sigma
  if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
    raise ValueError(f"config.sigma={sigma} must be a number > 0 (the pixel-space noise std; "
                     "the classifier sees 2*sigma in model space).")
  try:
    smoothing.check_certify_args(n0=config.n0, n=config.n, alpha=config.alpha)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  if config.mode not in MODES:
    raise ValueError(f"config.mode must be one of {MODES}, got {config.mode!r}.")
  if config.method not in METHODS:
    raise ValueError(f"config.method must be one of {METHODS}, got {config.method!r}.")
  if config.subset not in SUBSETS:
    raise ValueError(f"config.subset must be one of {SUBSETS}, got {config.subset!r}.")
  for key in ("every", "num_images", "chunk_size"):
    if not (isinstance(config[key], int) and config[key] >= 1):
      raise ValueError(f"config.{key}={config[key]!r} must be an integer >= 1.")
  if config.method == "dds":
    if config.init_from is not None or config.torch_checkpoint is not None:
      raise ValueError("config.init_from and config.torch_checkpoint name rRCM classifiers; with "
                       "config.method='dds' name the models in config.dds.denoiser and "
                       "config.dds.classifier.")
  elif (config.init_from is None) == (config.torch_checkpoint is None):
    raise ValueError("give exactly one classifier: config.init_from (a fine-tuning workdir) or "
                     "config.torch_checkpoint (the authors' .pth), got init_from="
                     f"{config.init_from!r}, torch_checkpoint={config.torch_checkpoint!r}.")
  if config.dtype not in (None,) + DTYPES:
    raise ValueError(f"config.dtype must be None (the classifier's) or one of {DTYPES}, "
                     f"got {config.dtype!r}.")
  if config.num_scales is not None and config.num_scales < 2:
    raise ValueError(f"config.num_scales={config.num_scales} must be at least 2 (or None).")
  models.validate_model_config(config.model)


def log_path(config, workdir):
  """<workdir>/certify_sigma0.25.tsv (or predict_...): several sigmas share a workdir."""
  return os.path.join(str(workdir), f"{config.mode}_sigma{float(config.sigma)}.tsv")


def _stem(path):
  return path[:-len(".tsv")] if path.endswith(".tsv") else path


# ----------------------------------------------------------------------------
# The log and its settings.
# ----------------------------------------------------------------------------
def run_settings(config, classifier):
  """What a log's rows depend on: a restart must use the same (num_images may grow)."""
  settings = dict(mode=config.mode, sigma=float(config.sigma), n=config.n,
                  alpha=float(config.alpha), seed=config.seed, data=config.data.name,
                  split=config.data.eval_split, subset=config.subset)
  if config.mode == "certify":
    settings["n0"] = config.n0
  if config.subset == "every":
    settings["every"] = config.every
  settings["order"] = "files"   # images chosen and indexed in the original files' order
  return dict(settings, classifier=classifier)


def check_settings(path, settings):
  """One sentence when the log at `path` was made with other settings."""
  sidecar = epath.Path(_stem(path) + ".json")
  if not sidecar.exists():
    return
  saved = json.loads(sidecar.read_text())["settings"]
  flat = lambda s: dict({k: v for k, v in s.items()
                         if k not in ("classifier", "inference_flops_per_sample")},
                        **{f"classifier.{k}": v for k, v in s["classifier"].items()
                           if k != "train_flops"})
  saved, ours = flat(saved), flat(settings)
  for key in sorted(set(saved) | set(ours)):
    if saved.get(key) != ours.get(key):
      raise ValueError(f"{path} was made with {key}={saved.get(key)!r}, this run has "
                       f"{ours.get(key)!r}; restart with the same settings or use another workdir.")


def logged_indices(path, mode):
  """Image indices already in the log or in any per-process part of it (all must be Cohen logs)."""
  done = set()
  for source in [path] + certlog.part_paths(path):
    if not epath.Path(source).exists() or epath.Path(source).stat().length == 0:
      continue
    log = certlog.read_log(source)
    if log["mode"] != mode:
      raise ValueError(f"{source} is a {log['mode']}-mode log, but config.mode is {mode!r}; "
                       "use another workdir or the matching mode.")
    done.update(int(i) for i in log["idx"])
  return done


def select_images(config):
  """[(canonical index, uint8 image [S, S, C], label)]: the config's subset, chosen and
  indexed in the original files' order (torchvision's and Cohen et al.'s): the IDX or
  CIFAR python files when `data.arrays` names them or the Debian Fashion-MNIST package is
  installed (`data.arrays.source_of`), CIFAR's TFDS `id` feature, class folders sorted."""
  from rrcm_jax.data import arrays  # pylint: disable=g-import-not-at-top
  kind = None if config.data.name in ("synthetic", "folder") else arrays.source_of(config.data)[0]
  if kind not in (None, "tfds"):
    subset = arrays.certification_subset
  else:
    from rrcm_jax.data import pipelines  # pylint: disable=g-import-not-at-top  (TensorFlow)
    subset = pipelines.certification_subset
  if config.subset == "first":
    return subset(config.data, split=config.data.eval_split, first=config.num_images)
  return subset(config.data, split=config.data.eval_split, every=config.every)[:config.num_images]


# ----------------------------------------------------------------------------
# Certifying.
# ----------------------------------------------------------------------------
def certify_image(sampler, params, config, index, image, label):
  """CERTIFY (or PREDICT) one image uint8 [H, W, C]: the LogWriter.write arguments."""
  start = time.time()
  if config.mode == "certify":
    selection, estimation = smoothing.certify_counts(sampler, params, image[None], [index],
                                                     config.n0, config.n)
    selection, estimation = selection[0], estimation[0]
    prediction, radius = smoothing.certify_from_counts(selection, estimation, config.sigma,
                                                       config.alpha)
  else:
    selection = None
    estimation = sampler.sample_counts(params, image[None], [index],
                                       smoothing.PREDICTION_STREAM, config.n)[0]
    prediction, radius = smoothing.predict_from_counts(estimation, config.alpha), None
  return dict(idx=index, label=label, predict=int(prediction), correct=prediction == label,
              seconds=time.time() - start, radius=radius, counts=(selection, estimation))


def _local_mesh_and_chunk(config):
  devices = jax.local_devices()
  mesh = parallel.make_mesh(devices)
  return mesh, -(-config.chunk_size // len(devices)) * len(devices)   # counts do not depend on it


def _barrier(name):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _write_records(workdir, path, config, settings):
  """Process 0: the settings beside the log, and the run in config.json / runs.jsonl."""
  if jax.process_index() != 0:
    return
  certlog.check_or_write_settings(path, settings)   # <log stem>.settings.json, written once
  sidecar = epath.Path(_stem(path) + ".json")
  if not sidecar.exists():
    sidecar.write_text(json.dumps(dict(settings=settings), indent=2) + "\n")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.classifier = settings["classifier"]
  workdir_lib.record_run(workdir, config)


def certify_images(sampler, params, config, images, writer, already_done=0):
  """Certifies `images` [(index, image, label)] into `writer`, with a progress bar
  (images done, noisy samples classified per second, ETA)."""
  per_image = config.n + (config.n0 if config.mode == "certify" else 0)
  total = already_done + len(images)
  progress = workdir_lib.Progress(total, "images", start=already_done)
  start, warm = time.time(), None
  for count, (index, image, label) in enumerate(images, start=1):
    row = certify_image(sampler, params, config, index, image, label)
    writer.write(row["idx"], row["label"], row["predict"], row["correct"], row["seconds"],
                 radius=row["radius"], counts=row["counts"])
    if count == 1:   # the first image pays for compilation: the rate counts the others
      rate, warm = per_image / row["seconds"], time.time()
    else:
      rate = (count - 1) * per_image / max(time.time() - warm, 1e-9)
    progress.update(already_done + count, samples_s=round(rate, 1))


def write_report(config, path, classifier):
  """Process 0: the report table of the log, printed and written to <log>.md."""
  log = certlog.read_log(path)
  table = report.markdown_table([f"sigma={float(config.sigma)}"], [log])
  images = (f"every {config.every}-th image of {config.data.eval_split}"
            if config.subset == "every" else f"the first ones of {config.data.eval_split}")
  header = (f"{config.mode.upper()} of {classifier['source']} ({classifier['checkpoint']}, "
            f"{classifier['dtype']}), sigma {float(config.sigma)} (pixel space), "
            f"n0 {config.n0}, n {config.n}, alpha {config.alpha}; {len(log['idx'])} images: "
            f"{images}.")
  text = f"{header}\n\n{table}\n"
  epath.Path(_stem(path) + ".md").write_text(text)
  print(text, flush=True)
  return text


ESTIMATE_CHUNKS = 3   # chunks timed per stream after the compiling call


def _time_counts(sampler, params, image, num):
  """Seconds of `sampler.dispatch_counts` for `num` samples of one image, compiled first."""
  sampler.dispatch_counts(params, image[None], [0], smoothing.ESTIMATION_STREAM,
                          num).block_until_ready()
  start = time.perf_counter()
  sampler.dispatch_counts(params, image[None], [0], smoothing.ESTIMATION_STREAM,
                          num).block_until_ready()
  return time.perf_counter() - start


def estimate_cost(config, images=None):
  """Compiles, times a few chunks on the local devices and prints what the whole run
  costs (wall time, noisy samples/s for images x (n0 + n)); writes nothing.

  Returns dict(images, samples, samples_s, seconds): samples over all processes,
  samples_s of one process, seconds the expected wall time (processes in parallel).
  """
  validate_config(config)
  mesh, chunk_size = _local_mesh_and_chunk(config)
  logits_fn, params, num_classes, logits_input, record, extra = load_base_classifier(config, mesh)
  record = described(record, extra)
  images = select_images(config) if images is None else images
  if not images:
    raise ValueError(f"config selects no images of {config.data.eval_split}; nothing to estimate.")
  sampler = smoothing.Sampler(logits_fn, num_classes, config.sigma, chunk_size=chunk_size,
                              mesh=mesh, seed=config.seed, logits_input=logits_input)
  image = images[0][1]
  timed = chunk_size * ESTIMATE_CHUNKS
  rate = timed / _time_counts(sampler, params, image, timed)
  per_image = config.n / rate
  n0 = config.n0 if config.mode == "certify" else 0
  if n0:   # the selection samples run in their own (smaller) chunk size
    per_image += _time_counts(sampler, params, image, n0)
  per_process = -(-len(images) // jax.process_count())
  seconds = per_process * per_image
  samples = len(images) * (config.n + n0)
  if jax.process_index() == 0:
    print(f"estimate: {config.mode} of {len(images)} images x (n0 {n0} + n {config.n}) = "
          f"{samples:,} noisy samples of {record['source']} ({record['dtype']}) at "
          f"{rate:,.0f} samples/s per process ({jax.local_device_count()} local device(s), "
          f"chunk {chunk_size}, {jax.process_count()} process(es)): about "
          f"{workdir_lib.format_duration(seconds)} of wall time, compilation excluded; "
          "nothing was written.", flush=True)
  return dict(images=len(images), samples=samples, samples_s=rate, seconds=seconds)


def run(config, workdir, images=None):
  """Certifies (or resumes) the config's images into `log_path(config, workdir)`.

  Args:
    images: optional [(index, uint8 image [S, S, C], label)], all processes'
      images in subset order; default `select_images(config)`.

  Returns:
    dict(log=path, certified=images certified by this process in this call,
    skipped=images of this process already logged, report=table (process 0) or None).
  """
  if config.get("estimate", False):
    return dict(estimate=estimate_cost(config, images))
  validate_config(config)
  path = log_path(config, workdir)
  done = logged_indices(path, config.mode)
  mesh, chunk_size = _local_mesh_and_chunk(config)
  logits_fn, params, num_classes, logits_input, record, extra = load_base_classifier(config, mesh)
  settings = dict(run_settings(config, record), **extra,
                  inference_flops_per_sample=inference_flops(config, logits_fn, params))
  check_settings(path, settings)
  certlog.check_or_write_settings(path, settings, write=False)   # written in _write_records
  images = select_images(config) if images is None else images
  mine = images[jax.process_index()::jax.process_count()]   # image k -> process k % P
  todo = [item for item in mine if item[0] not in done]
  _barrier("rrcm_certify_checked")   # every process has read the logs before anyone writes
  workdir_lib.ensure_writable(workdir)
  _write_records(workdir, path, config, settings)
  _announce(config, len(images), len(mine), len(todo), chunk_size)
  sampler = smoothing.Sampler(logits_fn, num_classes, config.sigma, chunk_size=chunk_size,
                              mesh=mesh, seed=config.seed, logits_input=logits_input)
  part = certlog.process_log_path(path, jax.process_index(), jax.process_count())
  with certlog.LogWriter(part, config.mode) as writer:
    certify_images(sampler, params, config, todo, writer, already_done=len(mine) - len(todo))
  _barrier("rrcm_certify_done")
  table = None
  if jax.process_index() == 0:
    if jax.process_count() > 1 or certlog.part_paths(path):
      certlog.merge_logs(path)
    table = write_report(config, path, described(record, extra))
  return dict(log=path, certified=len(todo), skipped=len(mine) - len(todo), report=table)


def _announce(config, num_images, num_mine, num_todo, chunk_size):
  if jax.process_index() != 0:
    return
  if num_images < config.num_images and config.subset == "every":
    print(f"note: every {config.every}-th image of {config.data.eval_split} gives only "
          f"{num_images} images (config.num_images={config.num_images}).", flush=True)
  print(f"{config.mode} at sigma {float(config.sigma)}: {num_images} images over "
        f"{jax.process_count()} process(es); this one has {num_mine}, {num_mine - num_todo} "
        f"already logged; {jax.local_device_count()} local device(s), chunk {chunk_size}.",
        flush=True)


def _num_classes(params):
  return int(params["head"]["bias"].shape[-1])


def load_base_classifier(config, mesh):
  """(logits_fn, params, num_classes, the sampler's logits_input, classifier record, extra
  settings) of config.method: rRCM's classifier sees x + sigma * eps ("noisy"); DDS's
  denoiser + classifier get the clean image and eps ("clean_and_noise"), and the extra
  settings name the denoiser, t* and sigma_added."""
  if config.method != "dds":
    logits_fn, params, record = classifier.load_smoothing_classifier(config, mesh)
    return logits_fn, params, _num_classes(params), "noisy", record, {}
  logits_fn, params, num_classes, dds_record = base_classifier.load(config, mesh)
  record = dds_record.pop("classifier")
  extra = dict(method="dds", denoiser=dds_record.pop("denoiser"), dds=dds_record)
  return logits_fn, params, num_classes, "clean_and_noise", record, extra


def inference_flops(config, logits_fn, params):
  """FLOPs (2 per multiply-add) of one noisy sample through the base classifier.

  rRCM (and every classifier smoothed directly): one forward of the ViT with its
  head, `flops.forward_flops` of config.model (the checkpoint's architecture is
  checked against it). DDS: the convolutions and matmuls of `logits_fn`'s jaxpr
  for one sample (`diffusion.train.matmul_flops`: the U-Net call at t*, the
  resize to the classifier's resolution, the classifier), traced on shapes only.
  """
  if config.method != "dds":
    return float(flops.forward_flops(config.model, _num_classes(params)))
  data = config.data
  image = jax.ShapeDtypeStruct((1, data.image_size, data.image_size, data.channels), jnp.float32)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  return diffusion_train.matmul_flops(logits_fn, shapes, image, image)


def described(record, extra):
  """The classifier record with a `source` that says what was smoothed (reports, estimates)."""
  if not extra:
    return record
  d, dds = extra["denoiser"], extra["dds"]
  denoiser = d["preset"] if d["step"] is None else f"{d['source']} (step {d['step']})"
  return dict(record, source=f"DDS: denoiser {denoiser}, t* {dds['t_star']}, sigma_added "
                             f"{dds['sigma_added']:.4f}; classifier {record['source']}")


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config.get("estimate", False):
    run(config, workdir)   # writes nothing, takes no lock
    return
  validate_config(config)   # before the lock creates the workdir
  with workdir_lib.lock(workdir):   # one run per workdir, for the whole run
    run(config, workdir)


if __name__ == "__main__":
  from rrcm_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, sys.argv)
