r"""Fine-tuning: a pre-trained rRCM encoder -> the classifier that certification smooths.

  python -m rrcm_jax.finetune --config=configs/fashion_mnist_finetune.py \
      --workdir=workdirs/fmnist/finetune --config.init_from=workdirs/fmnist/pretrain \
      --config.sigma=0.25

`config.sigma` is the certification noise in pixel space; training adds model-
space noise s = 2σ and conditions the encoder on the grid point nearest s
(SPEC "Fine-tuning"). Tasks ("consistency", "finetune", "linear") are loss
factories in `TASKS`. Every epoch: clean and noisy (model-space s in
`config.eval_levels`) accuracy on `config.data.val_split`, the best checkpoint
per metric in best_<metric>/, the last in checkpoints/; at the end the test
split (`config.data.eval_split`) for the last and every best checkpoint. A
restart with the same workdir resumes. `load_classifier` is what the
certification CLI reads.
"""
import dataclasses
import functools
import json
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from etils import epath

from rrcm_jax import checkpoints, classify, denoiser, losses, models, parallel
from rrcm_jax import workdir as workdir_lib
from rrcm_jax.data import mixup

load_classifier = classify.load_classifier   # what the certification CLI reads


# ----------------------------------------------------------------------------
# Tasks: small factories of losses, by name.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Task:
  """loss(noisy_logits, params, x, targets, key) -> (loss, metrics), with x model-space
  images [B, H, W, C], targets [B, K] and noisy_logits(params, x, key) the logits
  of x + s·ε at the training level; trains(path) says whether the optimizer
  updates a parameter; forward_equivalents counts FLOPs per image per step."""
  loss: Callable
  trains: Callable
  forward_equivalents: int


def _is_head(path):
  return getattr(path[0], "key", None) == "head"


def _accuracy(logits, targets):
  return jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))


def consistency_lambda(config):
  """λ: config.consistency.lam, or SPEC's 10 for σ <= 0.25 and 20 above when None."""
  lam = config.consistency.lam
  return lam if lam is not None else (10.0 if config.sigma <= 0.25 else 20.0)


def consistency_task(config):
  """Jeong & Shin (2020): m noise draws, CE + λ·KL to the mean + η·H(mean).
  The head trains only with config.train_head (default False, as the reference)."""
  m, lam, eta = config.consistency.draws, consistency_lambda(config), config.consistency.eta

  def loss(noisy_logits, params, x, targets, key):
    copies = jnp.concatenate([x] * m)          # row i·B + n: draw i of image n
    logits = noisy_logits(params, copies, key).reshape(m, x.shape[0], -1)
    total, parts = losses.consistency_loss(logits, targets, lam, eta)
    return total, dict(parts, acc=_accuracy(logits[0], targets))

  trains = (lambda path: True) if config.train_head else (lambda path: not _is_head(path))
  return Task(loss, trains, 3 * m)


def gaussian_task(config):
  """Gaussian noise augmentation (Cohen et al. 2019): CE + entropy_weight · mean entropy."""
  def loss(noisy_logits, params, x, targets, key):
    logits = noisy_logits(params, x, key)
    ce = jnp.mean(losses.soft_cross_entropy(logits, targets))
    entropy = losses.mean_entropy(logits)
    return ce + config.entropy_weight * entropy, dict(ce=ce, entropy=entropy,
                                                      acc=_accuracy(logits, targets))
  return Task(loss, lambda path: True, 3)


def linear_task(config):
  """A linear probe: the gaussian_task loss, only the head trains (encoder forward only)."""
  return Task(gaussian_task(config).loss, _is_head, 1)


TASKS = {"consistency": consistency_task, "finetune": gaussian_task, "linear": linear_task}


# ----------------------------------------------------------------------------
# Config checks: before anything compiles or is written.
# ----------------------------------------------------------------------------
def validate_config(config, mesh):
  """Raises ValueError with one sentence naming the bad key and what is allowed."""
  models.validate_model_config(config.model)
  if config.task not in TASKS:
    raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {config.task!r}.")
  if not config.sigma > 0:
    raise ValueError(f"config.sigma={config.sigma} must be > 0 (the pixel-space noise std; "
                     "training adds 2*sigma in model space).")
  if config.init_weights not in classify.WEIGHTS:
    raise ValueError(f"config.init_weights must be one of {sorted(classify.WEIGHTS)}, got "
                     f"{config.init_weights!r}.")
  for k in ("image_size", "channels"):
    if config.data[k] != config.model[k]:
      raise ValueError(f"config.data.{k}={config.data[k]} must equal config.model.{k}="
                       f"{config.model[k]}.")
  if not 0 <= config.optim.warmup_epochs <= config.epochs or config.epochs < 1:
    raise ValueError(f"config.optim.warmup_epochs={config.optim.warmup_epochs} must be in "
                     f"[0, config.epochs={config.epochs}] and epochs at least 1.")
  if not 0 < config.optim.layer_decay <= 1:
    raise ValueError(f"config.optim.layer_decay={config.optim.layer_decay} must be in (0, 1].")
  if any(s < 0 for s in config.eval_levels):
    raise ValueError(f"config.eval_levels={tuple(config.eval_levels)} must be model-space "
                     "noise levels >= 0.")
  if config.task == "consistency" and config.consistency.draws < 2:
    raise ValueError(f"config.consistency.draws={config.consistency.draws} must be at least 2.")
  if config.num_scales is not None and config.num_scales < 2:
    raise ValueError(f"config.num_scales={config.num_scales} must be at least 2 (or None).")
  if not 0 <= config.label_smoothing < 1:
    raise ValueError(f"config.label_smoothing={config.label_smoothing} must be in [0, 1).")
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, key="eval_batch_size")


# ----------------------------------------------------------------------------
# One step.
# ----------------------------------------------------------------------------
def make_train_step(config, model, tx, lr_fn, task, num_scales, mesh, shardings):
  """The jitted step: (state, batch {image uint8, label int}, key) -> (state, metrics).

  Noise s = 2·config.sigma (model space) at the grid point nearest s; soft
  targets from mixup/cutmix and label smoothing; frozen parameters get zero
  gradients (and no update).
  """
  s = denoiser.model_noise_level(config.sigma)
  sigma_j = classify.grid_sigma(s, num_scales, config.denoiser)
  batch_sharding = parallel.data_sharding(mesh)

  def noisy_logits(params, x, key):
    eps = jax.lax.with_sharding_constraint(jax.random.normal(key, x.shape, jnp.float32),
                                           batch_sharding)
    return classify.logits_at_level(model.apply, params, x + s * eps, sigma_j,
                                    config.denoiser.sigma_data)

  def step_fn(state, batch, key):
    key_mix, key_noise = jax.random.split(jax.random.fold_in(key, state.step))
    x, targets = mixup.mixup_cutmix(
        key_mix, denoiser.pixels_to_model(batch["image"]), batch["label"],
        config.data.num_classes, mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
        switch_prob=config.mixup_switch_prob, label_smoothing=config.label_smoothing)
    loss_fn = functools.partial(task.loss, noisy_logits)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, x, targets, key_noise)
    grads = jax.tree_util.tree_map_with_path(
        lambda path, g: g if task.trains(path) else jnp.zeros_like(g), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params), lr=lr_fn(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding, parallel.replicated(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------
class PipelineData:
  """The config's input pipelines (TensorFlow, imported here only)."""

  def __init__(self, config):
    from rrcm_jax.data import pipelines  # pylint: disable=g-import-not-at-top
    self.pipelines, self.config = pipelines, config

  def num_train(self):
    return self.pipelines.num_examples(self.config.data, self.config.data.train_split)

  def train(self, start_step):
    c = self.config
    return self.pipelines.finetune_batches(c.data, split=c.data.train_split,
                                           global_batch_size=c.batch_size, seed=c.seed,
                                           start_step=start_step, augment=c.augment)

  def evaluate(self, split):
    return self.pipelines.eval_batches(self.config.data, split=split,
                                       global_batch_size=self.config.eval_batch_size)


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------
class Run:
  """What a fine-tuning run keeps beside its state: checkpointers, metrics, bests."""

  def __init__(self, config, workdir, model, mesh, shardings, meta):
    self.config, self.workdir, self.model, self.mesh = config, workdir, model, mesh
    self.meta = meta                        # num_scales, init info, best values
    self.levels = [0.0] + [float(s) for s in config.eval_levels]
    self.names = [classify.metric_name(s) for s in self.levels]
    self.ckpt = checkpoints.Checkpointer(workdir, latest_every=config.latest_every)
    self.best = {n: checkpoints.Checkpointer(workdir, subdir=f"best_{n}") for n in self.names}
    self.metrics = workdir_lib.MetricsWriter(workdir)
    self.eval_step = classify.make_eval_step(model, meta["num_scales"], self.levels,
                                             config.denoiser, mesh, shardings.params,
                                             seed=config.seed)

  def validate(self, state, data, epoch):
    """Validation accuracies; keeps the best checkpoint of each metric."""
    acc = classify.evaluate(self.eval_step, state.params,
                            data.evaluate(self.config.data.val_split), self.mesh)
    step = int(state.step)
    self.metrics.write(step, dict({f"val/{k}": v for k, v in acc.items()}, epoch=epoch))
    for name, value in acc.items():
      if value > self.meta["best"].get(name, -1.0):
        self.meta["best"][name] = value
        self.best[name].save(step, state, meta=dict(self.meta, metric=name, value=value),
                             force=True)
    if jax.process_index() == 0:
      print(f"\nepoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()), flush=True)
    return acc

  def test(self, state, data, abstract):
    """Test-split accuracies of the last and of every best checkpoint -> test_results.json."""
    results, by_step = {}, {}
    for which in ["last"] + [f"best_{n}" for n in self.names]:
      ckpt = None if which == "last" else self.best[which[len("best_"):]]
      if ckpt is not None:
        ckpt.wait()   # saves are asynchronous
      step = int(state.step) if ckpt is None else ckpt.latest_step()
      if step is None:
        continue
      if step not in by_step:   # a best checkpoint is often the last one, or another best
        params = state.params if ckpt is None else ckpt.restore(abstract)[0].params
        by_step[step] = classify.evaluate(self.eval_step, params,
                                          data.evaluate(self.config.data.eval_split), self.mesh)
      results[which] = dict(by_step[step], step=step)
    row = {f"test/{w}/{k}": v for w, r in results.items() for k, v in r.items() if k != "step"}
    self.metrics.write(int(state.step), row)
    if jax.process_index() == 0:
      (epath.Path(self.workdir) / "test_results.json").write_text(json.dumps(results, indent=2))
      for which, r in results.items():
        print(f"test ({which}, step {r['step']}): " +
              ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "step"), flush=True)
    return results

  def close(self):
    for c in [self.ckpt, *self.best.values()]:
      c.close()


def _resume_meta(workdir):
  """The newest fine-tuning checkpoint's meta, or None; creates nothing."""
  if not (epath.Path(workdir) / "checkpoints").is_dir():
    return None
  ckpt = checkpoints.Checkpointer(workdir)
  try:
    return ckpt.restore_meta() if ckpt.latest_step() is not None else None
  finally:
    ckpt.close()


def train(config, workdir, data=None, mesh=None, stop_after=None):
  """Fine-tunes (or resumes) in `workdir`; returns the final state.

  Args:
    data: optional object with num_train(), train(start_step) -> iterator of
      per-process {image uint8, label} and evaluate(split) -> finite iterator of
      {image, label, mask, index}; default `PipelineData(config)`.
    stop_after: stop (with a checkpoint) after this many steps of this call.
  """
  mesh = mesh or parallel.make_mesh()
  validate_config(config, mesh)
  data = data or PipelineData(config)
  task = TASKS[config.task](config)
  model = classify.build_classifier(config)
  steps_per_epoch = config.steps_per_epoch or data.num_train() // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the training split "
                     f"{config.data.train_split}.")
  tx, lr_fn = classify.make_optimizer(config, steps_per_epoch, task.trains)
  abstract, shardings = classify.state_layout(config, model, tx, mesh)
  meta, overrides = _resume_meta(workdir), None
  if meta is None:   # a fresh run: a bad init_from stops here, before the workdir is touched
    overrides, info = classify.initial_params(config, abstract.params)
    meta = dict(num_scales=info["num_scales"], init=info, best={}, sigma=config.sigma)
  workdir_lib.ensure_writable(workdir)
  config = config.copy_and_resolve_references()
  config.num_scales = meta["num_scales"]   # certification reads N from here
  config.consistency.lam = consistency_lambda(config)
  config.steps_per_epoch = steps_per_epoch
  total = config.epochs * steps_per_epoch
  run = Run(config, workdir, model, mesh, shardings, meta)
  try:
    restored = run.ckpt.restore(abstract)
    if restored is None:
      state, _ = classify.create_state(config, model, tx, mesh, overrides)
    else:
      state = restored[0]
    workdir_lib.record_run(workdir, config)
    state = _loop(config, run, data, task, tx, lr_fn, state, shardings, steps_per_epoch, total,
                  stop_after)
    if int(state.step) >= total and not (epath.Path(workdir) / "test_results.json").exists():
      run.test(state, data, abstract)
  finally:
    run.close()
  return state


def _loop(config, run, data, task, tx, lr_fn, state, shardings, steps_per_epoch, total,
          stop_after):
  """Steps from state.step to `total` (or `stop_after` steps): metrics every log_every
  steps, validation and a forced checkpoint every epoch, a checkpoint on SIGTERM."""
  start = int(state.step)
  if start >= total:
    return state
  mesh, meta = run.mesh, run.meta
  if jax.process_index() == 0:
    print(f"fine-tuning ({config.task}, sigma {config.sigma}, N {meta['num_scales']}) "
          f"{models.count_params(state.params):,} parameters on {jax.device_count()} device(s), "
          f"{'resuming at' if start else 'starting at'} step {start} of {total}", flush=True)
  step_fn = make_train_step(config, run.model, tx, lr_fn, task, meta["num_scales"], mesh,
                            shardings)
  flops_per_step = config.batch_size * task.forward_equivalents * classify.forward_flops(
      config.model, config.data.num_classes)
  key, local = jax.random.key(config.seed), data.train(start)
  progress = workdir_lib.Progress(total, "step", start=start)
  watcher = checkpoints.PreemptionWatcher()
  pending, window_start, window_steps = [], time.time(), 0
  last = min(total, start + stop_after) if stop_after else total
  try:
    for step in range(start, last):
      state, metrics = step_fn(state, parallel.global_batch(next(local), mesh), key)
      pending.append((step, metrics))
      window_steps, done = window_steps + 1, step + 1
      epoch_end = done % steps_per_epoch == 0
      stop = watcher.should_stop(done) or done == last
      if done % config.log_every == 0 or epoch_end or stop or run.ckpt.manager.should_save(done):
        checkpoints.check_finite(pending, run.ckpt)
        row = {k: float(v) for k, v in pending[-1][1].items()}
        elapsed = max(time.time() - window_start, 1e-9)
        row.update(images_per_s=config.batch_size * window_steps / elapsed,
                   epoch=done / steps_per_epoch, train_flops=done * flops_per_step,
                   total_flops=done * flops_per_step + meta["init"]["pretrain_flops"])
        run.metrics.write(done, row)
        progress.update(done, loss=row["loss"], acc=round(row["acc"], 3),
                        img_s=round(row["images_per_s"], 1))
        pending, window_start, window_steps = [], time.time(), 0
        if epoch_end:
          run.validate(state, data, done // steps_per_epoch)
        meta.update(train_flops=done * flops_per_step)
        run.ckpt.save(done, state, meta=meta, force=epoch_end or stop)
      if stop:
        if done < last and jax.process_index() == 0:
          print(f"preempted: checkpoint written at step {done}", flush=True)
        break
  finally:
    watcher.restore_handler()
  return state


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from rrcm_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, sys.argv)
