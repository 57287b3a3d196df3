"""The one training loop of pre-training, fine-tuning and diffusion training.

  state = loop.run(state, step_fn, batches, key=key, checkpointer=ckpt,
                   writer=metrics_writer, total_steps=T, batch_size=B, log_every=50,
                   profile=loop.Profile.from_config(config, workdir))

Every `log_every` steps (and at each epoch's end, at each checkpoint and at
the last step) the loop checks that the pending steps' loss, gradient norm
and parameter norm are finite, writes the newest metrics with the window's
steps/s and images/s and the uptime (what CLU's `ReportProgress` reports),
updates the progress line, runs the per-epoch hook and offers the state to
the checkpointer (forced at an epoch's end and when stopping).

Profiling (`Profile`, what CLU's `periodic_actions.Profile` does, without
TensorFlow): config.profile_steps > 0 traces that many steps after the first
config.profile_start with `jax.profiler` into <workdir>/plugins/profile/,
where TensorBoard's profile tab (XProf) finds it. Each step runs inside a
`jax.profiler.StepTraceAnnotation`, so the trace shows steps.

Preemption: SIGTERM (Cloud TPU, SLURM) is turned into a flag checked at step
boundaries (`checkpoints.PreemptionWatcher`, agreed on by all processes);
the loop then writes a checkpoint and raises `Preempted`, which the command
line turns into exit status 75 (EX_TEMPFAIL: "preempted, rerun to resume").
A finished run returns its state (exit status 0).
"""
import sys
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


class Profile:
  """A `jax.profiler` trace of a window of steps of process 0, written to
  <logdir>/plugins/profile/<date_time>/<host>.xplane.pb (TensorBoard's profile tab).

  The trace opens once `start` steps are done and covers steps start + 1 ... start + steps,
  numbered as metrics.jsonl numbers them (the step count after the step). A run that
  resumes past `start` does not trace; one that resumes exactly there traces its
  compilation too. The trace closes after the window, or earlier when the run ends, is
  preempted or fails. `steps` = 0: off.
  """

  def __init__(self, logdir, start=0, steps=0):
    self.logdir, self.start, self.end = str(logdir), int(start), int(start) + int(steps)
    self.armed = steps > 0 and jax.process_index() == 0
    self.tracing = False

  @classmethod
  def from_config(cls, config, workdir):
    """From config.profile_start and config.profile_steps (absent: off)."""
    return cls(workdir, config.get("profile_start", 0), config.get("profile_steps", 0))

  def before(self, done):
    """Opens the trace when `done` steps open the window; returns the seconds it took."""
    if self.armed and done > self.start:   # resumed past the window
      self.armed = False
      print(f"note: no profile: this run starts after step {done}, past "
            f"profile_start={self.start}.", flush=True)
    if not (self.armed and done == self.start):
      return 0.0
    began, self.armed = time.time(), False
    try:
      jax.profiler.start_trace(self.logdir)
      self.tracing = True
    except RuntimeError as e:   # one trace per process: another profiler holds it
      print(f"warning: profiling after step {done} not started ({e}).", file=sys.stderr,
            flush=True)
    return time.time() - began

  def after(self, done, state):
    """Closes the trace once `done` steps close the window, after their device work;
    returns the seconds that took beyond the steps."""
    if not (self.tracing and done >= self.end):
      return 0.0
    jax.block_until_ready(state)   # the window's last step lands in the trace
    began = time.time()
    self.stop(done)
    return time.time() - began

  def stop(self, done):
    """Closes a running trace (the run ended, was preempted or failed after `done` steps)."""
    if not self.tracing:
      return
    self.tracing = False
    try:
      jax.profiler.stop_trace()
    except (RuntimeError, OSError) as e:   # a profile is not worth the run
      print(f"warning: the profile of steps {self.start + 1}-{done} was not written ({e}).",
            file=sys.stderr, flush=True)
      return
    print(f"profile of steps {self.start + 1}-{done} written to {self.logdir}/plugins/profile",
          flush=True)


def default_progress(row):
  """The progress line's fields: the loss and images/s."""
  return dict(loss=row["loss"], img_s=round(row["images_per_s"], 1))


def _timing(pending, window_start, began, batch_size):
  """The window's steps/s and images/s and the uptime (s since this run's loop began)."""
  now = time.time()
  steps_per_sec = len(pending) / max(now - window_start, 1e-9)
  return dict(steps_per_sec=steps_per_sec, images_per_s=batch_size * steps_per_sec,
              uptime=now - began)


def run(state, step_fn, batches, *, key, checkpointer, writer, total_steps, batch_size,
        log_every, stop_after=None, steps_per_epoch=None, on_epoch=None, row_fn=None,
        progress_fn=default_progress, meta_fn=None, monitor=None, profile=None):
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
    profile: optional `Profile` (a trace of a window of steps); its start and stop are
      not counted in images/s.

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
  profile = profile or Profile("", steps=0)
  began = time.time()
  pending, window_start = [], began
  try:
    for step in range(start, last):
      done = step + 1
      window_start += profile.before(step)
      # ~1.5 µs a step when no trace runs (measured), so always on; numbered like the rows.
      with jax.profiler.StepTraceAnnotation("train", step_num=done):
        state, metrics = step_fn(state, next(batches), key)
      pending.append((step, metrics))
      window_start += profile.after(done, state)
      epoch_end = bool(steps_per_epoch) and done % steps_per_epoch == 0
      stop = watcher.should_stop(done) or done == last
      if (done % log_every == 0 or epoch_end or stop
          or checkpointer.manager.should_save(done)):
        checkpoints.check_finite(pending, checkpointer)
        row = {k: float(v) for k, v in pending[-1][1].items()}
        row.update(_timing(pending, window_start, began, batch_size))
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
    if profile.tracing:
      profile.stop(int(state.step))
    watcher.restore_handler()
  return state
