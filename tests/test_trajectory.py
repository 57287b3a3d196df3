"""Twelve steps of the authors' pre-training loop, replayed through our step.

`rrcm_trajectory.npz` (tests/testdata/README.md) records their `train.py` loop
on random weights, float32: the three views, ε and the grid index of every
step, and after every step the loss and its two terms, the learning rate, the
target-EMA rate, the number of scales, the gradient norm before and after
clipping, the clipping factor, the projection head's BatchNorm running
statistics, and at the end the three networks and AdamW's moments.

Every setting of the replay comes from the recording's `meta` (model, batch,
horizon, warm-up, optimizer, clipping, EMA rates, target-EMA and scale
schedules, diffusion constants), so another recording with the same keys
passes unchanged. The recorded views, ε and index go through
`pretrain_step.train_update`, the pure function our jitted step calls after
drawing the index and ε; the schedules it evaluates in float32 are compared at
float32 tolerance, and the same schedule functions evaluated in float64 must
give the recorded float64 values to the last bits.

Where the authors' loop has a trap, the test pins our decision:
- clipping is a function of the step: a run checkpointed after step 6 and
  restored gives the same numbers as the uninterrupted run (theirs sets its
  clipping flag only when the counter passes the end of warm-up, so a run
  resumed after warm-up never clips again);
- the metrics carry the gradient norm before clipping (`grad_norm`) and after
  (`grad_norm_clipped`, what their logger calls grad_norm);
- the EMA model keeps parameters only: theirs never moves its BatchNorm
  statistics, and nothing downstream reads them.
"""
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from conftest import reference_file
from rrcm_jax import checkpoints, models, optim, pretrain_step, schedules, torch_import
from rrcm_jax import train_state

REFERENCE = reference_file("rrcm_trajectory.npz")
LOSS_RTOL = 1e-5        # README of the recording: losses within ~1e-5 relative
WEIGHT_ATOL = 1e-6      # final weights within ~1e-6 absolute
F32_RTOL = 2.4e-7       # two float32 ulps: the schedules as the jitted step evaluates them
RESUME_AT = 6
_BN = {"1": "bn_0", "4": "bn_1"}   # torch projection_head.{1,4} -> our bn_{0,1}


# ----------------------------------------------------------------------------
# The recording and the config it implies.
# ----------------------------------------------------------------------------
def load_reference(path=REFERENCE):
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  arrays["meta"] = json.loads(bytes(arrays["meta"]))
  return arrays


@pytest.fixture(scope="module")
def ref():
  return load_reference()


def _state_dict(ref, prefix):
  return {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}


def config_from_meta(meta):
  """Our pre-training config with every setting the recording states."""
  net, opt, sched = meta["nnet"], meta["optimizer"], meta["lr_scheduler"]
  train, ema, diff = meta["train"], meta["ema_scale"], meta["diffusion"]
  # Settings our implementation has no switch for: the recording must use ours.
  assert not net["qkv_bias"] and net["drop"] == net["attn_drop"] == net["drop_path"] == 0
  assert net["p_uncond"] == 0 and diff["rescale_t"] and not meta["scale_lr"]
  assert sched["name"] == "warmup-cosine" and sched["min_scale"] == -1
  assert train["gradclip_method"] == "after_warmup"
  assert ema["target_ema_mode"] == "sigmoid" and ema["scale_mode"] == "icm"
  assert ema["tau"] == diff["tau"]
  assert not opt["amsgrad"] and opt["params"] == "all online parameters, one group"
  assert meta["batchnorm"]["running_var"] == "unbiased batch variance"
  assert (meta["batchnorm"]["momentum"], meta["batchnorm"]["eps"]) == (0.1, 1e-5)
  assert sched["total_training_steps"] == train["total_training_steps"]

  config = common.pretrain_config(
      total_steps=train["total_training_steps"], batch_size=meta["batch"], lr=opt["lr"],
      weight_decay=opt["weight_decay"], warmup_divisor=1, ema_rate=train["ema_rate"],
      target_ema_A=ema["target_ema_A"])
  # Plain values: the horizons below are set one by one, not carried by total_steps.
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = common.model_config(
      width=net["embed_dim"], depth=net["depth"], num_heads=net["num_heads"],
      patch_size=net["patch_size"], image_size=net["image_size"], channels=net["in_channels"],
      proj_hidden=net["hidden_dim"], proj_out=net["output_dim"])
  config.model.mlp_ratio = net["mlp_ratio"]
  config.model.time_mlp = net["mlp_time_embed"]
  config.model.frozen_patch_embed = net["stop_grad_conv1"]
  config.optim.warmup_steps = sched["warmup_steps"]
  config.optim.b1, config.optim.b2 = opt["betas"]
  config.optim.eps = opt["eps"]
  config.optim.grad_clip = train["gradclip"]
  config.scales.update(start=ema["start_scales"], end=ema["end_scales"],
                       total_steps=ema["total_steps"])
  config.target_ema.update(start=ema["start_ema"], end=ema["end_ema"],
                           decay_steps=ema["ema_decay_steps"])
  config.temperature = diff["tau"]
  config.denoiser.update(sigma_min=diff["sigma_min"], sigma_max=diff["sigma_max"],
                         rho=diff["rho"], sigma_data=diff["sigma_data"])
  return config


@pytest.fixture(scope="module")
def setup(ref):
  return make_setup(ref)


def make_setup(ref):
  """(config, model, tx, state before step 0, jitted train_update)."""
  config = config_from_meta(ref["meta"])
  model = models.rcm_encoder(config.model)
  tx = optim.pretrain_optimizer(config)
  inputs = models.sample_inputs(config.model)
  load = lambda prefix: torch_import.load_variables(_state_dict(ref, prefix), model, inputs)
  online, target, ema = load("sd/"), load("target_sd/"), load("ema_sd/")
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=online["params"],
      opt_state=tx.init(online["params"]), batch_stats=online["batch_stats"],
      target_params=target["params"], target_batch_stats=target["batch_stats"],
      ema_params=ema["params"])
  state = jax.tree.map(jnp.asarray, state)
  update = jax.jit(functools.partial(pretrain_step.train_update, apply_fn=model.apply, tx=tx,
                                     config=config))
  return config, model, tx, state, update


def _inputs(ref, k):
  nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))
  views = {"x": nhwc(ref["x_start"][k]), "a1": nhwc(ref["x_aug"][k]),
           "a2": nhwc(ref["x_aug2"][k])}
  return views, nhwc(ref["noise"][k]), jnp.int32(ref["index"][k])


def _run(ref, update, state, steps):
  """Runs `steps` through `update`; returns (state, [metrics], [(online, target) stats])."""
  metrics, stats = [], []
  for k in steps:
    state, m = update(state, *_inputs(ref, k))
    metrics.append(jax.device_get(m))
    stats.append(jax.device_get((state.batch_stats, state.target_batch_stats)))
  return state, metrics, stats


@pytest.fixture(scope="module")
def trajectory(ref, setup):
  """The uninterrupted replay: final state, per-step metrics and BatchNorm statistics."""
  _, _, _, state, update = setup
  state, metrics, stats = _run(ref, update, state, range(len(ref["step"])))
  return jax.device_get(state), metrics, stats


def _per_step(metrics, key):
  return np.array([float(m[key]) for m in metrics])


# ----------------------------------------------------------------------------
# Schedules: float64 against float64, float32 inside the step.
# ----------------------------------------------------------------------------
def test_schedules_in_float64(ref):
  config = config_from_meta(ref["meta"])
  o, s, e = config.optim, config.scales, config.target_ema
  steps = [int(k) for k in ref["step"]]
  with jax.enable_x64():
    lr = np.array([float(schedules.learning_rate(k, o.lr, o.warmup_steps, config.total_steps))
                   for k in steps])
    mu = np.array([float(schedules.target_ema(k, e.decay_steps, e.start, e.end, e.A))
                   for k in steps])
    traced_n = [int(schedules.num_scales(jnp.int32(k), s.total_steps, s.start, s.end))
                for k in steps]
  assert lr[0] == 0.0                                   # f(0) = 0: the first update has lr 0
  # The reference forms ½(1 + cos x), itself only good to ~1e-16 / f(k) relative.
  np.testing.assert_allclose(lr, ref["lr"], rtol=1e-14, atol=0)
  np.testing.assert_allclose(mu, ref["target_ema"], rtol=1e-15, atol=0)
  python_n = [schedules.num_scales(k, s.total_steps, s.start, s.end) for k in steps]
  np.testing.assert_array_equal(python_n, ref["num_scales"])
  np.testing.assert_array_equal(traced_n, ref["num_scales"])


def test_step_schedules_in_float32(ref, trajectory):
  metrics = trajectory[1]
  np.testing.assert_allclose(_per_step(metrics, "lr"), ref["lr"], rtol=F32_RTOL, atol=0)
  np.testing.assert_allclose(_per_step(metrics, "target_ema"), ref["target_ema"],
                             rtol=F32_RTOL, atol=0)
  np.testing.assert_array_equal(_per_step(metrics, "num_scales"), ref["num_scales"])
  np.testing.assert_array_equal(_per_step(metrics, "grid_index"), ref["index"])
  assert (ref["indices"] == ref["index"][:, None]).all()    # one index per batch


# ----------------------------------------------------------------------------
# Per step: loss, gradient norms, clipping, BatchNorm statistics.
# ----------------------------------------------------------------------------
def test_loss_and_terms(ref, trajectory):
  metrics = trajectory[1]
  for key, want in (("loss", ref["loss"]), ("contrast", ref["loss_contrast"].mean(1)),
                    ("consistency", ref["loss_consistency"].mean(1))):
    np.testing.assert_allclose(_per_step(metrics, key), want, rtol=LOSS_RTOL, err_msg=key)
  np.testing.assert_allclose(ref["loss"], ref["loss_per_example"].mean(1), rtol=1e-6)


def test_gradient_norms_before_and_after_clipping(ref, trajectory):
  metrics = trajectory[1]
  before, after = _per_step(metrics, "grad_norm"), _per_step(metrics, "grad_norm_clipped")
  np.testing.assert_allclose(before, ref["grad_norm"], rtol=LOSS_RTOL)
  np.testing.assert_allclose(after, ref["logged_grad_norm"], rtol=LOSS_RTOL)
  np.testing.assert_allclose(_per_step(metrics, "param_norm"), ref["logged_param_norm"],
                             rtol=1e-6)


def test_clipping_decisions_and_factors(ref, setup, trajectory):
  config, metrics = setup[0], trajectory[1]
  factor = _per_step(metrics, "grad_norm_clipped") / _per_step(metrics, "grad_norm")
  after_warmup = ref["step"] >= config.optim.warmup_steps
  np.testing.assert_array_equal(after_warmup, ~ref["is_warmup"])
  np.testing.assert_array_equal(ref["clip_on"], after_warmup)
  np.testing.assert_array_equal(factor < 1, ref["clipped"])
  assert ref["clipped"].any() and not ref["clipped"].all()   # the recording tests both
  np.testing.assert_allclose(factor, ref["clip_coef"], rtol=LOSS_RTOL)


def test_batchnorm_running_statistics_every_step(ref, trajectory):
  stats = trajectory[2]
  for k, (online, target) in enumerate(stats):
    for which, ours in (("traj_online_bn", online), ("traj_target_bn", target)):
      for layer, bn in _BN.items():
        for kind in ("mean", "var"):
          want = ref[f"{which}/projection_head.{layer}.running_{kind}"][k]
          got = ours["projection_head"][bn][kind]
          np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6,
                                     err_msg=f"step {k} {which} {bn} {kind}")


def test_distance_from_start_every_step(ref, setup, trajectory):
  """‖θ_k − θ_0‖ of the three networks: where a trajectory would depart."""
  del trajectory   # the replay below records the parameters of every step
  _, _, _, state, update = setup
  start = state.params
  dist = lambda a: np.sqrt(sum(float(np.sum((np.asarray(x, np.float64) - y) ** 2))
                               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(start))))
  got = {"online": [], "target": [], "ema": []}
  for k in range(len(ref["step"])):
    state, _ = update(state, *_inputs(ref, k))
    for name, params in (("online", state.params), ("target", state.target_params),
                         ("ema", state.ema_params)):
      got[name].append(dist(jax.device_get(params)))
  for name in got:
    # atol: float32 rounding of θ·μ + θ·(1 − μ) alone moves the target by 1e-6 at step 0.
    np.testing.assert_allclose(got[name], ref[f"{name}_delta_norm"], rtol=1e-3, atol=1e-5,
                               err_msg=name)


# ----------------------------------------------------------------------------
# After the last step: the three networks and AdamW.
# ----------------------------------------------------------------------------
def _max_abs(ours, theirs):
  return max(float(np.max(np.abs(np.asarray(a) - b)))
             for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)))


def test_final_weights(ref, trajectory):
  state = trajectory[0]
  for name, ours in (("final_sd/", state.params), ("final_target_sd/", state.target_params),
                     ("final_ema_sd/", state.ema_params)):
    theirs = torch_import.from_torch(_state_dict(ref, name))["params"]
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    assert _max_abs(ours, theirs) <= WEIGHT_ATOL, name
  start = torch_import.from_torch(_state_dict(ref, "sd/"))["params"]
  assert _max_abs(state.params, start) > 100 * WEIGHT_ATOL    # the weights did move


def test_final_adam_moments_and_step(ref, trajectory):
  opt_state = trajectory[0].opt_state
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  assert int(adam[0].count) == int(ref["final_adam_step"]) == len(ref["step"])
  for ours, key in ((adam[0].mu, "final_adam_exp_avg/"), (adam[0].nu, "final_adam_exp_avg_sq/")):
    theirs = torch_import.from_torch(_state_dict(ref, key))["params"]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      rel = np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)
      assert rel <= 5e-5, (key, rel)


# ----------------------------------------------------------------------------
# Traps of the authors' loop.
# ----------------------------------------------------------------------------
def test_resume_after_warmup_still_clips(ref, setup, trajectory, tmp_path):
  """Checkpoint after RESUME_AT steps, restore, run the rest: the uninterrupted numbers."""
  config, _, _, state, update = setup
  assert RESUME_AT > config.optim.warmup_steps     # resumed past warm-up: the reference's trap
  state, first, _ = _run(ref, update, state, range(RESUME_AT))
  ckpt = checkpoints.Checkpointer(tmp_path)
  ckpt.save(RESUME_AT, state, force=True)
  ckpt.close()
  abstract = checkpoints.abstract_like(state)
  del state
  ckpt = checkpoints.Checkpointer(tmp_path)
  restored, meta = ckpt.restore(abstract)
  ckpt.close()
  assert meta["step"] == RESUME_AT == int(restored.step)
  final, rest, _ = _run(ref, update, restored, range(RESUME_AT, len(ref["step"])))
  uninterrupted_state, uninterrupted, _ = trajectory
  for key in ("loss", "grad_norm", "grad_norm_clipped"):
    np.testing.assert_array_equal(_per_step(first + rest, key), _per_step(uninterrupted, key))
  factor = _per_step(rest, "grad_norm_clipped") / _per_step(rest, "grad_norm")
  assert (factor < 1).all()        # every resumed step clips, as the uninterrupted run
  for ours, theirs in zip(jax.tree.leaves(jax.device_get(final)),
                          jax.tree.leaves(uninterrupted_state)):
    np.testing.assert_array_equal(ours, theirs)


def test_ema_model_batchnorm_statistics(ref, setup, trajectory):
  """Theirs: the EMA model's running statistics never move. Ours: it holds none, and
  the features every later stage takes from it do not depend on them."""
  for layer in _BN:
    for kind in ("running_mean", "running_var"):
      name = f"projection_head.{layer}.{kind}"
      np.testing.assert_array_equal(ref[f"final_ema_sd/{name}"], ref[f"ema_sd/{name}"])
      assert not np.array_equal(ref[f"ema_sd/{name}"], ref[f"sd/{name}"])
    assert int(ref[f"final_ema_sd/projection_head.{layer}.num_batches_tracked"]) == 0
  _, model, _, _, _ = setup
  state = trajectory[0]
  assert "ema_batch_stats" not in {f.name for f in
                                   train_state.TrainState.__dataclass_fields__.values()}
  x = jnp.asarray(np.transpose(ref["x_start"][0], (0, 2, 3, 1)))
  t = jnp.zeros((x.shape[0],))
  stats = [state.batch_stats, state.target_batch_stats]
  outs = [model.apply({"params": state.ema_params, "batch_stats": s}, x, t, train=False)
          for s in stats]
  np.testing.assert_array_equal(outs[0][1], outs[1][1])     # feature h: no statistics
  assert not np.allclose(outs[0][0], outs[1][0])             # projection z: statistics


def _decay_only_update(state, config, **optim_overrides):
  """(params, params after one update with zero gradients and lr = base lr)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.optim.update(weight_decay=0.1, warmup_steps=0, **optim_overrides)   # lr(0) = base
  tx = optim.pretrain_optimizer(config)
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  updates, _ = tx.update(zeros, tx.init(state.params), state.params)
  return config, jax.tree_util.tree_leaves_with_path(optax.apply_updates(state.params, updates))


@pytest.mark.parametrize("decay_on", ["all", "vit"])
def test_weight_decay_set(setup, decay_on):
  """"all" (default): the reference's one AdamW parameter group, biases, norms,
  pos_embed and cls_token decay too. "vit": those are spared."""
  config, _, _, state, _ = setup
  config, after = _decay_only_update(state, config, weight_decay_on=decay_on)
  shrink = 1.0 - config.optim.lr * config.optim.weight_decay
  spared = 0
  for (path, new), old in zip(after, jax.tree.leaves(state.params)):
    name = jax.tree_util.keystr(path)
    exempt = decay_on == "vit" and (old.ndim <= 1 or "pos_embed" in name or "cls_token" in name)
    spared += exempt
    np.testing.assert_allclose(new, old if exempt else old * shrink, rtol=1e-6, atol=1e-12,
                               err_msg=name)
  assert (spared > 0) == (decay_on == "vit")


def test_optimizer_reads_eps(setup):
  config, _, _, state, _ = setup
  config = ml_collections.ConfigDict(config.to_dict())
  config.optim.update(warmup_steps=0, weight_decay=0.0)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
  def first_update(eps):
    config.optim.eps = eps
    tx = optim.pretrain_optimizer(config)
    return jax.tree.leaves(tx.update(grads, tx.init(state.params), state.params)[0])[0]
  # Adam's first step is −lr·g/(|g| + ε): ε = |g| halves it.
  np.testing.assert_allclose(first_update(1e-3), 0.5 * first_update(0.0), rtol=1e-5)


def test_unknown_weight_decay_set_is_refused(setup):
  config = ml_collections.ConfigDict(setup[0].to_dict())
  config.optim.weight_decay_on = "biases"
  with pytest.raises(ValueError, match="weight_decay_on"):
    optim.pretrain_optimizer(config)
