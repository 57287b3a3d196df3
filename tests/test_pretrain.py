"""Pre-training: the sharded step equals the single-device one, resume is exact,
bad input stops early, NaN stops training, the CLI runs and survives SIGTERM."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import subprocess_xla_flags
from configs import common
from rrcm_jax import checkpoints, losses, models, optim, parallel, pretrain, pretrain_step
from rrcm_jax import schedules

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(batch_size=16, total_steps=6, **model_overrides):
  config = common.pretrain_config(total_steps=total_steps, batch_size=batch_size, lr=1e-3,
                                  weight_decay=0.01, warmup_divisor=3, ema_rate=0.9,
                                  target_ema_A=15)
  config.data = common.data_config("synthetic", image_size=8, channels=3, num_classes=4)
  config.model = common.model_config(width=32, depth=1, num_heads=2, patch_size=4, image_size=8,
                                     channels=3, proj_hidden=16, proj_out=8)
  config.model.update(model_overrides)
  config.log_every = 1
  config.latest_every = 1
  config.save_every = 100
  return config


def synthetic_batches(batch_size, size=8, channels=3):
  """start_step -> iterator; batch k depends only on k (resumable like the real pipeline)."""
  def batches(start_step):
    step = start_step
    while True:
      rng = np.random.default_rng(1000 + step)
      yield {k: rng.integers(0, 256, (batch_size, size, size, channels), dtype=np.uint8)
             for k in ("x", "a1", "a2")}
      step += 1
  return batches


def _grads(config, mesh, batch, index=3, num_scales=21):
  model = models.rcm_encoder(config.model)
  tx = optim.pretrain_optimizer(config)
  state, _ = pretrain_step.create_state(config, model, tx, mesh)
  views = {k: parallel.global_batch({k: batch[k]}, mesh)[k] for k in batch}
  views = {k: jax.numpy.asarray(v, jnp.float32) / 127.5 - 1 for k, v in views.items()}
  noise = jax.device_put(np.random.default_rng(0).standard_normal(batch["x"].shape, np.float32),
                         parallel.data_sharding(mesh))

  @jax.jit
  def f(params):
    return jax.value_and_grad(losses.pretrain_loss, has_aux=True)(
        params, state.target_params, state.batch_stats, state.target_batch_stats, views, noise,
        index, num_scales, apply_fn=model.apply, denoiser_cfg=config.denoiser)

  (loss, aux), grads = f(state.params)
  return float(loss), grads, aux


def test_eight_devices_equal_one_device():
  assert jax.device_count() == 8
  config = tiny_config()
  batch = next(synthetic_batches(16)(0))
  loss1, g1, aux1 = _grads(config, parallel.make_mesh(jax.devices()[:1]), batch)
  loss8, g8, aux8 = _grads(config, parallel.make_mesh(), batch)
  assert loss1 == pytest.approx(loss8, rel=1e-6)
  g1, g8 = jax.device_get((g1, g8))
  diff = optax.tree.norm(jax.tree.map(lambda a, b: a - b, g8, g1))
  assert float(diff / optax.tree.norm(g1)) <= 1e-5
  for a, b in zip(jax.tree.leaves(aux1["batch_stats"]), jax.tree.leaves(aux8["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batchnorm_normalizes_each_call_over_its_own_batch():
  """Concatenating two views into one call would change the loss.

  docs/method.md, Pre-training objective, step 7.
  """
  config = tiny_config()
  batch = next(synthetic_batches(16)(0))
  loss_full, _, _ = _grads(config, parallel.make_mesh(jax.devices()[:1]), batch)
  half = {k: v[:8] for k, v in batch.items()}
  loss_half, _, _ = _grads(config, parallel.make_mesh(jax.devices()[:1]), half)
  assert abs(loss_full - loss_half) > 1e-3   # the batch statistics matter


def test_initial_loss_near_three_log_batch():
  # The sizes of tests/testdata/rrcm_small.npz: width 64, projection 128 -> 32.
  config = tiny_config(batch_size=8, width=64, depth=2, num_heads=4, proj_hidden=128,
                       proj_out=32)
  views = next(synthetic_batches(8)(0))
  loss, _, aux = _grads(config, parallel.make_mesh(jax.devices()[:1]), views)
  # docs/method.md, Pre-training objective: ≈ 6.2 for 8 images.
  assert loss == pytest.approx(3 * np.log(8), abs=0.5)
  assert aux["contrast"].shape == (8,) and aux["consistency"].shape == (8,)


def _run(config, workdir, mesh=None, stop_after=None):
  return pretrain.train(config, str(workdir), batches=synthetic_batches(config.batch_size),
                        mesh=mesh or parallel.make_mesh(jax.devices()[:1]), stop_after=stop_after)


def test_resume_is_exact_and_metrics_are_logged(tmp_path):
  config = tiny_config()
  straight = _run(config, tmp_path / "a")
  _run(config, tmp_path / "b", stop_after=3)
  assert checkpoints.Checkpointer(tmp_path / "b").latest_step() == 3
  resumed = _run(config, tmp_path / "b")
  assert int(resumed.step) == 6
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert {"loss", "contrast", "consistency", "grad_norm", "param_norm", "lr", "target_ema",
          "num_scales", "images_per_s"} <= set(rows[0])
  assert rows[0]["num_scales"] == 21 and rows[1]["num_scales"] == 41
  assert rows[0]["lr"] == 0.0 and rows[-1]["lr"] > 0
  runs = [json.loads(l) for l in (tmp_path / "b" / "runs.jsonl").read_text().splitlines()]
  assert len(runs) == 2 and runs[0]["seed"] == 0 and runs[0]["code_version"]
  assert runs[0]["platform"] == "cpu" and runs[0]["device_kind"] and "matmul_precision" in runs[0]
  assert json.loads((tmp_path / "b" / "config.json").read_text())["total_steps"] == 6


def test_target_and_ema_follow_their_rates(tmp_path):
  config = tiny_config(total_steps=2)
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = models.rcm_encoder(config.model)
  tx = optim.pretrain_optimizer(config)
  state, shardings = pretrain_step.create_state(config, model, tx, mesh)
  step = pretrain_step.make_train_step(config, model, tx, mesh, shardings)
  batch = parallel.global_batch(next(synthetic_batches(16)(0)), mesh)
  state, _ = step(state, batch, jax.random.key(0))   # lr 0 at step 0: params unchanged
  before = jax.tree.map(np.asarray, state)
  state, metrics = step(state, parallel.global_batch(next(synthetic_batches(16)(1)), mesh),
                        jax.random.key(0))
  mu = float(schedules.target_ema(1, config.target_ema.decay_steps, A=15.0))
  assert float(metrics["target_ema"]) == pytest.approx(mu)
  p, t0 = np.asarray(state.params["vit"]["pos_embed"]), before.target_params["vit"]["pos_embed"]
  np.testing.assert_allclose(state.target_params["vit"]["pos_embed"], mu * t0 + (1 - mu) * p,
                             rtol=1e-5, atol=1e-7)
  e0 = before.ema_params["vit"]["pos_embed"]
  np.testing.assert_allclose(state.ema_params["vit"]["pos_embed"], 0.9 * e0 + 0.1 * p,
                             rtol=1e-5, atol=1e-7)


def test_fsdp_and_remat_give_the_same_numbers(tmp_path):
  config = tiny_config(total_steps=3)
  base = _run(config, tmp_path / "dp", mesh=parallel.make_mesh())
  config_fsdp = tiny_config(total_steps=3, remat=True)
  config_fsdp.mesh.fsdp = True
  config_fsdp.mesh.fsdp_min_size = 256
  sharded = _run(config_fsdp, tmp_path / "fsdp", mesh=parallel.make_mesh())
  kernel = sharded.params["vit"]["blocks_0"]["fc1"]["kernel"]
  assert not kernel.sharding.is_fully_replicated      # really sharded over "data"
  base_p, sharded_p = jax.device_get((base.params, sharded.params))
  diff = optax.tree.norm(jax.tree.map(lambda a, b: a - b, base_p, sharded_p))
  assert float(diff / optax.tree.norm(base_p)) <= 1e-5
  rows = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
          for d in ("dp", "fsdp")]
  for a, b in zip(*rows):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch):
  real = schedules.learning_rate
  monkeypatch.setattr(schedules, "learning_rate",
                      lambda step, *a, **kw: jnp.where(step >= 3, jnp.inf, real(step, *a, **kw)))
  config = tiny_config(total_steps=8)
  with pytest.raises(FloatingPointError, match=r"at step \d") as err:
    _run(config, tmp_path)
  ckpt = checkpoints.Checkpointer(tmp_path)
  assert ckpt.latest_step() is not None and str(ckpt.latest_step()) in str(err.value)
  state = pretrain_step.create_state(config, models.rcm_encoder(config.model),
                                     optim.pretrain_optimizer(config),
                                     parallel.make_mesh(jax.devices()[:1]))[0]
  restored, _ = ckpt.restore(checkpoints.abstract_like(state))
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(restored.params))


@pytest.mark.parametrize("key,value,match", [
    ("model.patch_size", 3, "patch_size=3 must divide"),
    ("model.num_heads", 3, "num_heads=3 must divide"),
    ("batch_size", 12, "batch_size=12 must be divisible by the number of devices"),
    ("denoiser.sigma_min", 100.0, "sigma_min=100.0 must be positive and below"),
    ("data.image_size", 16, "data.image_size=16 must equal"),
    ("data.pretrain_crop_scale", (0.0, 1.0), r"pretrain_crop_scale=\(0.0, 1.0\) must be"),
])
def test_impossible_configs_stop_before_compiling(key, value, match, tmp_path):
  config = tiny_config()
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=match):
    pretrain_step.validate_config(config, parallel.make_mesh())
  assert not (tmp_path / "x").exists()


def test_relative_workdir_checkpoints_and_resumes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)   # Orbax needs absolute paths; the Checkpointer makes them
  config = tiny_config(total_steps=2)
  _run(config, "relative/run", stop_after=1)
  assert int(_run(config, "relative/run").step) == 2
  assert checkpoints.Checkpointer(tmp_path / "relative/run").latest_step() == 2


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(ValueError, match="is not writable"):
    _run(tiny_config(), blocker / "sub")


def test_total_steps_override_carries_derived_quantities():
  from configs import fashion_mnist_pretrain, cifar10_pretrain_rcmb
  config = fashion_mnist_pretrain.get_config()
  config.total_steps = 400
  assert config.optim.warmup_steps == 20
  assert config.target_ema.decay_steps == 400 and config.scales.total_steps == 400
  paper = cifar10_pretrain_rcmb.get_config()
  assert (paper.optim.warmup_steps, paper.target_ema.decay_steps) == (10_000, 300_000)
  paper.optim.warmup_steps = 7                # set explicitly: stays
  paper.total_steps = 1000
  assert paper.optim.warmup_steps == 7 and paper.scales.total_steps == 1000


CLI_TINY = ["--config.data.name=synthetic", "--config.model.width=32", "--config.model.depth=1",
            "--config.model.num_heads=2", "--config.model.proj_hidden=16",
            "--config.model.proj_out=8", "--config.batch_size=16", "--config.log_every=1",
            "--config.latest_every=2", "--config.knn_every=0"]


def _cli(workdir, *extra):
  env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(), PYTHONUNBUFFERED="1")
  return subprocess.Popen(
      [sys.executable, "-m", "rrcm_jax.pretrain", "--config=configs/fashion_mnist_pretrain.py",
       f"--workdir={workdir}", *CLI_TINY, *extra], cwd=REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_cli_unknown_key_is_one_clear_error(tmp_path):
  proc = _cli(tmp_path / "w", "--config.model.widht=3")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "widht" in out
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_cli_trains_survives_sigterm_and_resumes(tmp_path):
  workdir = tmp_path / "w"
  proc = _cli(workdir, "--config.total_steps=100000")
  lines, deadline = [], time.time() + 240
  for line in proc.stdout:
    lines.append(line)
    if "step 3/" in line or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  text = "".join(lines) + out
  assert "preempted: checkpoint written at step" in text, text[-2000:]
  assert proc.returncode == 75   # EX_TEMPFAIL: preempted, rerun to resume
  step = checkpoints.Checkpointer(workdir).latest_step()
  assert step is not None and step >= 3
  # a longer or shorter run is a binding change: allowed by name
  proc = _cli(workdir, f"--config.total_steps={step + 2}", "--config.allow_changes=total_steps")
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out[-2000:]
  assert f"resuming at step {step}" in out
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == step + 2
