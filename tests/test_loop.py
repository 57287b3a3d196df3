"""The one training loop (rrcm_jax/loop.py): rows, epochs, checkpoints, stop_after,
non-finite metrics, preemption and profiling, with a trivial step (nothing to compile)."""
import json
import os
import re
import signal

import flax.struct
import jax
import jax.numpy as jnp
import pytest

from configs import common
from rrcm_jax import checkpoints, config_checks, loop
from rrcm_jax import workdir as workdir_lib


@flax.struct.dataclass
class State:
  step: jnp.ndarray
  w: jnp.ndarray


def _step(state, batch, key):
  del key
  loss = jnp.asarray(batch, jnp.float32)
  return State(step=state.step + 1, w=state.w + loss), dict(loss=loss, grad_norm=loss)


def _run(tmp_path, batches, total=6, start=0, **kwargs):
  ckpt = checkpoints.Checkpointer(tmp_path, latest_every=100)
  writer = workdir_lib.MetricsWriter(tmp_path)
  state = State(step=jnp.full((), start, jnp.int32), w=jnp.zeros(()))
  try:
    return loop.run(state, _step, iter(batches), key=None, checkpointer=ckpt, writer=writer,
                    total_steps=total, batch_size=4, log_every=2, **kwargs), ckpt
  finally:
    ckpt.close()
    writer.close()


def _rows(tmp_path):
  return [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_rows_epochs_meta_and_stop_after(tmp_path):
  epochs = []
  state, ckpt = _run(tmp_path, [1.0] * 6, steps_per_epoch=3, stop_after=5,
                     on_epoch=lambda s, e: epochs.append((int(s.step), e)),
                     row_fn=lambda done: dict(epoch=done / 3),
                     meta_fn=lambda done: dict(seen=done))
  assert int(state.step) == 5 and float(state.w) == 5.0
  rows = _rows(tmp_path)
  steps = [r["step"] for r in rows]   # every 2, the epoch's end, the stop (and Orbax's first)
  assert {2, 3, 4, 5} <= set(steps) <= {1, 2, 3, 4, 5} and steps[-1] == 5
  assert rows[steps.index(3)]["epoch"] == 1.0 and all(r["images_per_s"] > 0 for r in rows)
  # What CLU's ReportProgress writes: the window's steps/s (× batch 4 = images/s), the uptime.
  for r in rows:
    assert r["images_per_s"] == pytest.approx(4 * r["steps_per_sec"]) and r["uptime"] >= 0
  assert [r["uptime"] for r in rows] == sorted(r["uptime"] for r in rows)
  assert epochs == [(3, 1)]
  assert ckpt.latest_step() == 5 and ckpt.restore_meta()["seen"] == 5


def test_nonfinite_loss_stops_before_it_is_saved(tmp_path):
  with pytest.raises(FloatingPointError, match="at step 2"):
    _run(tmp_path, [1.0, 1.0, float("nan"), 1.0, 1.0, 1.0])


def test_sigterm_checkpoints_and_raises_preempted(tmp_path):
  def batches():
    for i in range(6):
      if i == 3:   # SIGTERM arrives during step 4
        os.kill(os.getpid(), signal.SIGTERM)
      yield 1.0

  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(loop.Preempted) as err:
    _run(tmp_path, batches())
  assert err.value.step == 4 and err.value.exit_code == loop.EX_TEMPFAIL == 75
  assert signal.getsignal(signal.SIGTERM) == previous   # the handler is given back
  ckpt = checkpoints.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 4
  ckpt.close()


# ----------------------------------------------------------------------------
# Profiling.
# ----------------------------------------------------------------------------
def _traces(workdir):
  return sorted((workdir / "plugins" / "profile").glob("*/*.xplane.pb"))


def test_profile_window_writes_one_trace_and_the_run_completes(tmp_path, capsys):
  state, _ = _run(tmp_path, [1.0] * 6, profile=loop.Profile(tmp_path, start=2, steps=2))
  assert int(state.step) == 6
  traces = _traces(tmp_path)
  assert len(traces) == 1 and b"step_num" in traces[0].read_bytes()   # the steps' annotations
  assert f"profile of steps 3-4 written to {tmp_path}/plugins/profile" in capsys.readouterr().out


def test_no_profile_writes_nothing(tmp_path):
  _run(tmp_path, [1.0] * 6)
  _run(tmp_path / "off", [1.0] * 6, profile=loop.Profile(tmp_path / "off", start=2, steps=0))
  assert not (tmp_path / "plugins").exists() and not (tmp_path / "off" / "plugins").exists()


def test_a_run_that_ends_or_is_preempted_inside_the_window_closes_the_trace(tmp_path):
  # The window (steps 5-14) runs past the last step (6): the trace closes with the run.
  state, _ = _run(tmp_path / "end", [1.0] * 6, profile=loop.Profile(tmp_path / "end", 4, 10))
  assert int(state.step) == 6 and len(_traces(tmp_path / "end")) == 1

  def batches():
    for i in range(6):
      if i == 3:   # SIGTERM arrives during step 4, inside the window (steps 2-5)
        os.kill(os.getpid(), signal.SIGTERM)
      yield 1.0

  with pytest.raises(loop.Preempted):
    _run(tmp_path / "pre", batches(), profile=loop.Profile(tmp_path / "pre", 1, 4))
  assert len(_traces(tmp_path / "pre")) == 1
  jax.profiler.start_trace(str(tmp_path / "after"))   # raises if a trace were still running
  jax.profiler.stop_trace()


def test_a_resumed_run_past_the_window_does_not_trace(tmp_path, capsys):
  state, _ = _run(tmp_path, [1.0] * 3, start=3, profile=loop.Profile(tmp_path, start=2, steps=2))
  assert int(state.step) == 6 and not _traces(tmp_path)
  assert "no profile: this run starts after step 3, past profile_start=2" in capsys.readouterr().out


@pytest.mark.parametrize("key,value,allowed", [
    ("profile_start", -1, "an integer >= 0"),
    ("profile_steps", -2, "an integer >= 0 (0: no profiling)"),
])
def test_bad_profile_keys_are_one_sentence(key, value, allowed):
  config = common.demo_pretrain_config()
  config[key] = value
  with pytest.raises(ValueError, match="^" + re.escape(f"config.{key}={value!r} must be {allowed}.")
                     + "$"):
    config_checks.validate_training(config)


def test_a_window_after_the_last_step_is_refused_one_that_overruns_it_is_not():
  config = common.demo_pretrain_config()
  config.total_steps, config.profile_steps = 20, 5
  config.profile_start = 18   # steps 19-23: ends with the run
  config_checks.validate_training(config)
  config.profile_start = 20
  with pytest.raises(ValueError, match=r"^config.profile_start=20 must be below the run's 20 "
                     r"steps .*profile_steps=0\.$"):
    config_checks.validate_training(config)
  config.profile_steps = 0   # off: any start
  config_checks.validate_training(config)
  finetune = common.finetune_config(common.setup("fashion_mnist"), sigma=0.25, epochs=2,
                                    warmup_epochs=0, batch_size=64, lr=1e-3, layer_decay=0.65)
  finetune.steps_per_epoch, finetune.profile_steps, finetune.profile_start = 3, 1, 6
  with pytest.raises(ValueError, match=r"profile_start=6 must be below the run's 6 steps"):
    config_checks.validate_training(finetune)
