r"""Fine-tuning: config -> mesh -> data -> state -> loop, from a pre-trained rRCM encoder
to the classifier that certification smooths.

  python -m rrcm_jax.finetune --config=configs/fashion_mnist_finetune.py \
      --workdir=workdirs/fmnist/finetune --config.init_from=workdirs/fmnist/pretrain \
      --config.sigma=0.25

`config.sigma` is the certification noise in pixel space; training adds model-
space noise s = 2σ and conditions the encoder on the grid point nearest s
(docs/method.md, "Fine-tuning"). Every epoch: clean and noisy (model-space s
in `config.eval_levels`) accuracy on `config.data.val_split`, the best
checkpoint per metric in best_<metric>/, the last in checkpoints/; at the end
the test split (`config.data.eval_split`) for the last and every best
checkpoint. A restart with the same workdir resumes; exit status 75 when
SIGTERM stopped the run (checkpoint written), 0 when it is complete. Tasks,
the step and the state live in `rrcm_jax.finetune_step`, the optimizer in
`rrcm_jax.optim`, loading classifiers in `rrcm_jax.classifier`.
"""
import json
import sys

import jax
from etils import epath

from rrcm_jax import checkpoints, classifier, config_checks, finetune_step, flops, loop, models
from rrcm_jax import optim, parallel
from rrcm_jax import workdir as workdir_lib
from rrcm_jax.data import device
from rrcm_jax.evaluators import accuracy


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
# Evaluations: validation every epoch with the best checkpoints, the test split at the end.
# ----------------------------------------------------------------------------
class Evaluations:
  """Validation accuracies every epoch (keeping the best checkpoint of each metric)
  and the test accuracies of the last and every best checkpoint at the end."""

  def __init__(self, config, workdir, model, mesh, shardings, meta, data, writer):
    self.workdir, self.meta, self.writer = workdir, meta, writer
    predict = classifier.level_logits_fn(model, meta["num_scales"], config.denoiser)
    self.val = accuracy.Evaluator(predict, lambda: data.evaluate(config.data.val_split),
                                  [0.0] + list(config.eval_levels), mesh, shardings.params,
                                  seed=config.seed)
    self.test_split = self.val.with_batches(lambda: data.evaluate(config.data.eval_split))
    self.best = {n: checkpoints.Checkpointer(workdir, subdir=f"best_{n}") for n in self.val.names}

  def on_epoch(self, state, epoch):
    """Validation accuracies at the end of `epoch`; keeps the best checkpoint of each metric."""
    acc = dict(self.val.run(state.params))
    step = int(state.step)
    self.writer.write(step, dict({f"val/{k}": v for k, v in acc.items()}, epoch=epoch))
    for name, value in acc.items():
      if value > self.meta["best"].get(name, -1.0):
        self.meta["best"][name] = value
        self.best[name].save(step, state, meta=dict(self.meta, metric=name, value=value),
                             force=True)
    if jax.process_index() == 0:
      print(f"\nepoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()), flush=True)

  def test(self, state, abstract):
    """Test-split accuracies of the last and of every best checkpoint -> test_results.json."""
    results, by_step = {}, {}
    for which in ["last"] + [f"best_{n}" for n in self.val.names]:
      ckpt = None if which == "last" else self.best[which[len("best_"):]]
      if ckpt is not None:
        ckpt.wait()   # saves are asynchronous
      step = int(state.step) if ckpt is None else ckpt.latest_step()
      if step is None:
        continue
      if step not in by_step:   # a best checkpoint is often the last one, or another best
        params = state.params if ckpt is None else ckpt.restore(abstract)[0].params
        by_step[step] = dict(self.test_split.run(params))
      results[which] = dict(by_step[step], step=step)
    row = {f"test/{w}/{k}": v for w, r in results.items() for k, v in r.items() if k != "step"}
    self.writer.write(int(state.step), row)
    if jax.process_index() == 0:
      (epath.Path(self.workdir) / "test_results.json").write_text(json.dumps(results, indent=2))
      for which, r in results.items():
        print(f"test ({which}, step {r['step']}): " +
              ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "step"), flush=True)
    return results

  def close(self):
    for c in self.best.values():
      c.close()


# ----------------------------------------------------------------------------
# Config and the run's meta.
# ----------------------------------------------------------------------------
def _resume_meta(workdir):
  """The newest fine-tuning checkpoint's meta, or None; creates nothing."""
  if not (epath.Path(workdir) / "checkpoints").is_dir():
    return None
  ckpt = checkpoints.Checkpointer(workdir)
  try:
    return ckpt.restore_meta() if ckpt.latest_step() is not None else None
  finally:
    ckpt.close()


def _run_meta(config, workdir, abstract_params):
  """(meta, parameter overrides or None): the checkpoint's meta when resuming, else a fresh
  one from config.init_from (a bad init_from stops here, before the workdir is touched)."""
  meta = _resume_meta(workdir)
  if meta is not None:
    return meta, None
  overrides, info = classifier.initial_params(config, abstract_params)
  return dict(num_scales=info["num_scales"], init=info, best={}, sigma=config.sigma), overrides


def _resolved(config, meta, steps_per_epoch):
  """The config as recorded: N, λ and steps per epoch filled in (certification reads N)."""
  config = config.copy_and_resolve_references()
  config.num_scales = meta["num_scales"]
  config.consistency.lam = finetune_step.consistency_lambda(config)
  config.steps_per_epoch = steps_per_epoch
  return config


def _steps_per_epoch(config, data):
  steps = config.steps_per_epoch or data.num_train() // config.batch_size
  if steps < 1:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the training split "
                     f"{config.data.train_split}.")
  return steps


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------
def train(config, workdir, data=None, mesh=None, stop_after=None):
  """Fine-tunes (or resumes) in `workdir`; returns the final state.

  Args:
    data: optional object with num_train(), train(start_step) -> iterator of
      per-process numpy or global jax.Array batches {image uint8, label} and
      evaluate(split) -> finite iterator of {image, label, mask, index}; default
      by config.data.pipeline: `device.ConfigData` ("device") or `PipelineData` ("tfdata").
    stop_after: stop (with a checkpoint) after this many steps of this call.

  Raises:
    loop.Preempted: SIGTERM stopped the run (after a checkpoint).
  """
  # Config and mesh.
  mesh = mesh or parallel.make_mesh()
  config = device.resolve_pipeline(config)
  finetune_step.validate_config(config, mesh)
  if data is None:
    data = device.ConfigData(config, mesh) if config.data.pipeline == "device" else PipelineData(config)
  task = finetune_step.TASKS[config.task](config)
  model = classifier.build_classifier(config)
  steps_per_epoch = _steps_per_epoch(config, data)
  tx, lr_fn = optim.finetune_optimizer(config, steps_per_epoch, task.trains)
  abstract, shardings = finetune_step.state_layout(config, model, tx, mesh)
  meta, overrides = _run_meta(config, workdir, abstract.params)
  workdir_lib.ensure_writable(workdir)
  config = _resolved(config, meta, steps_per_epoch)
  total = config.epochs * steps_per_epoch

  # State, evaluations, loop.
  ckpt = checkpoints.Checkpointer(workdir, latest_every=config.latest_every)
  writer = workdir_lib.MetricsWriter(workdir)
  evals = Evaluations(config, workdir, model, mesh, shardings, meta, data, writer)
  try:
    restored = ckpt.restore(abstract)
    if restored is None:
      state, _ = finetune_step.create_state(config, model, tx, mesh, overrides)
    else:
      state = restored[0]
    workdir_lib.record_run(workdir, config, writer=writer)
    if int(state.step) < total:
      step_fn = finetune_step.make_train_step(config, model, tx, lr_fn, task,
                                              meta["num_scales"], mesh, shardings)
      state = _loop(config, workdir, state, step_fn, data, mesh, ckpt, writer, evals, task,
                    total, stop_after)
    if int(state.step) >= total and not (epath.Path(workdir) / "test_results.json").exists():
      evals.test(state, abstract)
  finally:
    for closing in (ckpt, evals, writer):
      closing.close()
  return state


def _global(batch, mesh):
  """A global batch: jax.Arrays (the device pipeline's) as they are, numpy made global."""
  if all(isinstance(v, jax.Array) for v in batch.values()):
    return batch
  return parallel.global_batch(batch, mesh)


def _loop(config, workdir, state, step_fn, data, mesh, ckpt, writer, evals, task, total,
          stop_after):
  """`loop.run` with fine-tuning's rows (epoch, FLOPs), progress (accuracy) and meta."""
  start, meta, steps_per_epoch = int(state.step), evals.meta, config.steps_per_epoch
  if jax.process_index() == 0:
    print(f"fine-tuning ({config.task}, sigma {config.sigma}, N {meta['num_scales']}) "
          f"{models.count_params(state.params):,} parameters on {jax.device_count()} device(s), "
          f"{'resuming at' if start else 'starting at'} step {start} of {total}", flush=True)
  flops_per_step = config.batch_size * task.forward_equivalents * flops.forward_flops(
      config.model, config.data.num_classes)

  def row(done):
    return dict(epoch=done / steps_per_epoch, train_flops=done * flops_per_step,
                total_flops=done * flops_per_step + meta["init"]["pretrain_flops"])

  def checkpoint_meta(done):
    meta.update(train_flops=done * flops_per_step)
    return meta

  return loop.run(
      state, step_fn, (_global(b, mesh) for b in data.train(start)),
      key=jax.random.key(config.seed), checkpointer=ckpt, writer=writer, total_steps=total,
      batch_size=config.batch_size, log_every=config.log_every, stop_after=stop_after,
      steps_per_epoch=steps_per_epoch, on_epoch=evals.on_epoch, row_fn=row,
      progress_fn=lambda r: dict(loss=r["loss"], acc=round(r["acc"], 3),
                                 img_s=round(r["images_per_s"], 1)),
      meta_fn=checkpoint_meta, profile=loop.Profile.from_config(config, workdir))


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  config_checks.run_trainer(train, config, workdir)


if __name__ == "__main__":
  from rrcm_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, sys.argv)
