"""The one training loop of pre-training and fine-tuning.

  state = loop.run(state, step_fn, batches, key=key, checkpointer=ckpt,
                   writer=metrics_writer, total_steps=T, batch_size=B, log_every=50)

Every `log_every` steps (and at each epoch's end, at each checkpoint and at
the last step) the loop checks that the pending steps' loss, gradient norm
and parameter norm are finite, writes the newest metrics with the images/s of
the window, updates the progress line, runs the per-epoch hook and offers the
state to the checkpointer (forced at an epoch's end and when stopping).

Preemption: SIGTERM (Cloud TPU, SLURM) is turned into a flag checked at step
boundaries (`checkpoints.PreemptionWatcher`, agreed on by all processes);
the loop then writes a checkpoint and raises `Preempted`, which the command
line turns into exit status 75 (EX_TEMPFAIL: "preempted, rerun to resume").
A finished run returns its state (exit status 0).
"""
import time

import jax

from rrcm_jax import checkpoints
from rrcm_jax import workdir as workdir_lib

EX_TEMPFAIL = 75   # sysexits.h: a temporary failure; rerunning the command resumes


class Preempted(Exception):
  """Training stopped on SIGTERM at `step`, with a checkpoint written: rerun to resume."""
  exit_code = EX_TEMPFAIL

  def __init__(self, step):
    super().__init__(f"preempted: checkpoint written at step {step}; rerun the same command "
                     "to resume.")
    self.step = step


def default_progress(row):
  """The progress line's fields: the loss and images/s."""
  return dict(loss=row["loss"], img_s=round(row["images_per_s"], 1))


def run(state, step_fn, batches, *, key, checkpointer, writer, total_steps, batch_size,
        log_every, stop_after=None, steps_per_epoch=None, on_epoch=None, row_fn=None,
        progress_fn=default_progress, meta_fn=None, monitor=None):
  """Steps `state` from state.step to `total_steps` (or `stop_after` steps of this call).

  Args:
    state: the train state; training starts at its `step`.
    step_fn: jitted (state, global batch, key) -> (state, metrics {name: scalar}).
    batches: iterator of global batches, the first one for step state.step.
    key: the run's key (the step folds its step in).
    checkpointer: `checkpoints.Checkpointer`; its manager decides the interval saves.
    writer: `workdir.MetricsWriter` (one JSON line per logged step).
    total_steps: the run's length; batch_size: the global batch (for images/s).
    log_every: steps between logged rows.
    stop_after: stop (with a checkpoint) after this many steps of this call,
      as an interruption would (tests).
    steps_per_epoch, on_epoch: on_epoch(state, epoch) after each epoch's last
      step is logged, before its (forced) checkpoint: validation, best checkpoints.
    row_fn: done -> extra metrics for a logged row (epoch, FLOPs).
    progress_fn: row -> the progress line's fields.
    meta_fn: done -> the checkpoint's JSON meta (called before on_epoch).
    monitor: optional (every, fn): fn(state, done) -> {name: scalar}, written as its own
      row every `every` steps (the k-NN monitor); its time is not counted in images/s.

  Returns:
    The final state.

  Raises:
    Preempted: after checkpointing, when SIGTERM arrived before the last step.
    FloatingPointError: at the first non-finite loss or norm, before it is saved.
  """
  start = int(state.step)
  last = min(total_steps, start + stop_after) if stop_after else total_steps
  progress = workdir_lib.Progress(total_steps, "step", start=start)
  watcher = checkpoints.PreemptionWatcher()
  pending, window_start = [], time.time()
  try:
    for step in range(start, last):
      state, metrics = step_fn(state, next(batches), key)
      pending.append((step, metrics))
      done = step + 1
      epoch_end = bool(steps_per_epoch) and done % steps_per_epoch == 0
      stop = watcher.should_stop(done) or done == last
      if (done % log_every == 0 or epoch_end or stop
          or checkpointer.manager.should_save(done)):
        checkpoints.check_finite(pending, checkpointer)
        row = {k: float(v) for k, v in pending[-1][1].items()}
        row["images_per_s"] = batch_size * len(pending) / max(time.time() - window_start, 1e-9)
        row.update(row_fn(done) if row_fn else {})
        writer.write(done, row)
        progress.update(done, **progress_fn(row))
        pending, window_start = [], time.time()
        meta = meta_fn(done) if meta_fn else None
        if epoch_end and on_epoch:
          on_epoch(state, done // steps_per_epoch)
        checkpointer.save(done, state, meta=meta, force=epoch_end or stop)
      if monitor and done % monitor[0] == 0:
        monitor_start = time.time()
        writer.write(done, monitor[1](state, done))
        window_start += time.time() - monitor_start
      if stop:
        if done < last:
          if jax.process_index() == 0:
            print(f"preempted: checkpoint written at step {done}", flush=True)
          raise Preempted(done)
        break
  finally:
    watcher.restore_handler()
  return state
