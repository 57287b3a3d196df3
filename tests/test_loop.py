"""The one training loop (rrcm_jax/loop.py): rows, epochs, checkpoints, stop_after,
non-finite metrics and preemption, with a trivial step (nothing to compile)."""
import json
import os
import signal

import flax.struct
import jax.numpy as jnp
import pytest

from rrcm_jax import checkpoints, loop
from rrcm_jax import workdir as workdir_lib


@flax.struct.dataclass
class State:
  step: jnp.ndarray
  w: jnp.ndarray


def _step(state, batch, key):
  del key
  loss = jnp.asarray(batch, jnp.float32)
  return State(step=state.step + 1, w=state.w + loss), dict(loss=loss, grad_norm=loss)


def _run(tmp_path, batches, total=6, **kwargs):
  ckpt = checkpoints.Checkpointer(tmp_path, latest_every=100)
  writer = workdir_lib.MetricsWriter(tmp_path)
  state = State(step=jnp.zeros((), jnp.int32), w=jnp.zeros(()))
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
