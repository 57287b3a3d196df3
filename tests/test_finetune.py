"""Fine-tuning: noise conditioning, layer-wise lr decay, which parameters train,
8 devices = 1 device, exact resume, best checkpoints, loading from pre-training,
FLOP accounting, configs, and bad input that stops before the workdir is touched."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import subprocess_xla_flags

from configs import common, fashion_mnist_finetune, fashion_mnist_pretrain
from rrcm_jax import checkpoints, classifier, denoiser, finetune, finetune_step, flops, models
from rrcm_jax import optim, parallel, pretrain, pretrain_step, schedules
from rrcm_jax.evaluators import accuracy

REPO = pathlib.Path(__file__).resolve().parents[1]
ONE = lambda: parallel.make_mesh(jax.devices()[:1])


def tiny_pretrain_config(width=32, total_steps=4):
  config = common.pretrain_config(total_steps=total_steps, batch_size=8, lr=1e-3,
                                  weight_decay=0.0, warmup_divisor=4, ema_rate=0.5,
                                  target_ema_A=15)
  config.data = common.data_config("synthetic", image_size=8, channels=1, num_classes=4)
  config.model = common.model_config(width=width, depth=2, num_heads=2, patch_size=4,
                                     image_size=8, channels=1, proj_hidden=16, proj_out=8)
  config.log_every, config.latest_every, config.save_every = 1, 2, 2
  return config


def tiny_config(task="consistency", epochs=2, **overrides):
  config = common.finetune_config(
      tiny_pretrain_config(), sigma=0.25, epochs=epochs, warmup_epochs=0, batch_size=16,
      lr=1e-3, layer_decay=0.75)
  config.task = task
  config.steps_per_epoch = 2
  config.eval_batch_size = 8
  config.log_every = 1
  config.latest_every = 1
  config.update(overrides)
  return config


class ArrayData:
  """Synthetic class-dependent images; train batch k depends only on k (resumable),
  eval batches padded with mask/index like the real pipeline."""

  def __init__(self, batch=16, num_val=13, eval_batch=8, num_classes=4):
    self.batch, self.num_val, self.eval_batch, self.k = batch, num_val, eval_batch, num_classes

  def num_train(self):
    return 64

  def _images(self, labels, rng):
    x = rng.integers(0, 100, (len(labels), 8, 8, 1))
    for i, label in enumerate(labels):
      r, c = 4 * (label // 2), 4 * (label % 2)
      x[i, r:r + 4, c:c + 4] += 150
    return x.astype(np.uint8)

  def train(self, start_step):
    step = start_step
    while True:
      rng = np.random.default_rng(1000 + step)
      labels = rng.integers(0, self.k, self.batch)
      yield dict(image=self._images(labels, rng), label=labels.astype(np.int32))
      step += 1

  def evaluate(self, split):
    rng = np.random.default_rng(hash(split) % 1000)
    labels = rng.integers(0, self.k, self.num_val)
    images = self._images(labels, rng)
    for start in range(0, self.num_val, self.eval_batch):
      index = np.arange(start, start + self.eval_batch)
      real = np.minimum(index, self.num_val - 1)
      yield dict(image=images[real], label=labels[real].astype(np.int32),
                 mask=index < self.num_val, index=np.where(index < self.num_val, index, -1))


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain")

  def batches(start):
    step = start
    while True:
      rng = np.random.default_rng(step)
      yield {k: rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8) for k in ("x", "a1", "a2")}
      step += 1

  pretrain.train(tiny_pretrain_config(), str(workdir), batches=batches, mesh=ONE())
  return workdir


def _init_params(config):
  model = classifier.build_classifier(config)
  return jax.jit(lambda: model.init(jax.random.key(0), *models.sample_inputs(config.model)))()[
      "params"]


# ----------------------------------------------------------------------------
# Noise conditioning, optimizer, FLOPs.
# ----------------------------------------------------------------------------
def test_noise_levels_follow_spec():
  d = common.denoiser_config()
  assert classifier.grid_sigma(0.5, 81, d) == pytest.approx(0.492707, rel=1e-5)
  assert classifier.grid_sigma(2.0, 81, d) == pytest.approx(2.003647, rel=1e-5)
  assert classifier.grid_sigma(0.0, 81, d) == pytest.approx(0.002, rel=1e-5)   # s = 0 -> N - 1
  assert [accuracy.metric_name(s) for s in (0, 0.5, 1.0, 2.0)] == [
      "clean", "noisy_0.5", "noisy_1.0", "noisy_2.0"]
  config = tiny_config()
  model = classifier.build_classifier(config)
  params = _init_params(config)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  # The certification logits at pixel σ = 0.25 condition on grid point 53 (nearest 2σ = 0.5).
  smoothing = jax.jit(classifier.make_smoothing_logits_fn(model, 81, 0.25, d))(params, x)
  sigma_53 = float(denoiser.karras_sigma(53, 81))
  manual = jax.jit(model.apply)({"params": params}, denoiser.c_in(sigma_53) * x,
                                jnp.full((3,), denoiser.time_condition(sigma_53)))
  np.testing.assert_allclose(smoothing, manual, rtol=1e-5, atol=1e-6)


def test_layer_ids_weight_decay_and_layer_scales():
  config = tiny_config()
  params = _init_params(config)
  ids = {"/".join(getattr(k, "key", "") for k in path): optim.layer_id(path, 2)
         for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert ids["vit/cls_token"] == ids["vit/pos_embed"] == ids["vit/patch_embed/kernel"] == 0
  assert ids["vit/blocks_0/attn/qkv/kernel"] == 1 and ids["vit/blocks_1/fc2/bias"] == 2
  assert ids["vit/norm/scale"] == ids["head/kernel"] == ids["head/bias"] == 3
  decay = {"/".join(getattr(k, "key", "") for k in path): bool(optim.decays_weight(path, leaf))
           for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert decay["vit/blocks_0/fc1/kernel"] and decay["head/kernel"]
  assert not any(decay[k] for k in ("vit/cls_token", "vit/pos_embed", "head/bias",
                                    "vit/blocks_0/norm1/scale"))
  # First Adam step moves every weight by lr·scale (|update| = lr for a sign-like step).
  config.optim.per_epoch_lr = False
  config.optim.warmup_epochs = 0
  config.train_head = True
  tx, lr = optim.finetune_optimizer(config, 10, finetune_step.TASKS["consistency"](config).trains)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  peak = 1e-3 * 16 / 256
  assert float(lr(0)) == pytest.approx(peak)
  for name, layer in (("patch_embed", 0), ("blocks_0", 1), ("blocks_1", 2)):
    leaf = jax.tree.leaves(updates["vit"][name])[0]
    assert float(jnp.abs(leaf).max()) == pytest.approx(peak * 0.75 ** (3 - layer), rel=1e-4)
  assert float(jnp.abs(updates["head"]["bias"]).max()) == pytest.approx(peak, rel=1e-4)


def test_lr_per_epoch_is_piecewise_constant():
  config = tiny_config(epochs=10)
  config.optim.warmup_epochs = 2
  lr = optim.lr_schedule(config, steps_per_epoch=5)
  peak = 1e-3 * 16 / 256
  assert [float(lr(s)) for s in (0, 4, 5, 9)] == pytest.approx([0, 0, peak / 2, peak / 2])
  assert float(lr(10)) == pytest.approx(peak)
  config.optim.per_epoch_lr = False
  lr = optim.lr_schedule(config, steps_per_epoch=5)
  assert float(lr(5)) == pytest.approx(peak / 2) and float(lr(4)) == pytest.approx(peak * 0.4)


def test_forward_flops_match_spec_and_budgets():
  rcmb = common.model_config(width=768, depth=12, num_heads=12, patch_size=16, image_size=224)
  # docs/method.md, Certification: ≈ 17.7 G multiply-adds at 224, ≈ 5.7 G at 32 with p = 4.
  assert flops.forward_flops(rcmb) / 2 == pytest.approx(17.7e9, rel=0.01)
  cifar = common.model_config(width=768, depth=12, num_heads=12, patch_size=4, image_size=32)
  assert flops.forward_flops(cifar) / 2 == pytest.approx(5.7e9, rel=0.01)
  small = fashion_mnist_pretrain.get_config().model
  f = flops.forward_flops(small, num_classes=10)
  assert flops.training_flops("consistency", small, 5, 10) == 6 * 5 * f
  assert flops.training_flops("finetune", small, 5, 10) == 3 * 5 * f
  assert flops.training_flops("pretrain", small, 1) == 12 * flops.forward_flops(
      small, projection=True)
  with pytest.raises(ValueError, match="stage must be one of"):
    flops.training_flops("distill", small, 1)


# ----------------------------------------------------------------------------
# Steps: which parameters train, sharding.
# ----------------------------------------------------------------------------
def _one_step(config, mesh, overrides=None, steps=1):
  model = classifier.build_classifier(config)
  task = finetune_step.TASKS[config.task](config)
  tx, lr = optim.finetune_optimizer(config, 2, task.trains)
  state, shardings = finetune_step.create_state(config, model, tx, mesh, overrides)
  before = jax.device_get(state.params)
  step = finetune_step.make_train_step(config, model, tx, lr, task, 81, mesh, shardings)
  data = ArrayData().train(0)
  for _ in range(steps):
    state, metrics = step(state, parallel.global_batch(next(data), mesh), jax.random.key(0))
  return before, jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("task,train_head,vit_moves,head_moves", [
    ("consistency", False, True, False), ("consistency", True, True, True),
    ("finetune", False, True, True), ("linear", False, False, True)])
def test_which_parameters_train(task, train_head, vit_moves, head_moves):
  config = tiny_config(task, train_head=train_head)
  config.optim.per_epoch_lr = False
  before, after, metrics = _one_step(config, ONE())
  moved = lambda k: not all(np.array_equal(a, b) for a, b in
                            zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k])))
  assert moved("vit") == vit_moves and moved("head") == head_moves
  assert np.isfinite(metrics["loss"]) and metrics["lr"] > 0


def test_eight_devices_equal_one_device():
  config = tiny_config("consistency", train_head=True, mixup=0.8, cutmix=1.0,
                       label_smoothing=0.1)
  config.optim.per_epoch_lr = False
  _, p1, m1 = _one_step(config, ONE(), steps=2)
  _, p8, m8 = _one_step(config, parallel.make_mesh(), steps=2)
  assert jax.device_count() == 8
  for k in ("loss", "ce", "grad_norm"):
    assert m8[k] == pytest.approx(m1[k], rel=1e-5), k
  assert m8["kl"] == pytest.approx(m1["kl"], abs=1e-7)   # ≈ 0: the head starts at 2e-5
  diff = optax.tree.norm(jax.tree.map(lambda a, b: a - b, p8, p1))
  assert float(diff / optax.tree.norm(p1)) <= 1e-5


# ----------------------------------------------------------------------------
# Loading a pre-trained encoder.
# ----------------------------------------------------------------------------
def _abstract_params(config, mesh=None):
  tx, _ = optim.finetune_optimizer(config, 2, finetune_step.TASKS[config.task](config).trains)
  model = classifier.build_classifier(config)
  return finetune_step.state_layout(config, model, tx, mesh or ONE())[0].params


@pytest.mark.parametrize("weights,field", [("ema", "ema_params"), ("online", "params"),
                                           ("target", "target_params")])
def test_encoder_weights_come_from_the_chosen_copy(pretrain_dir, weights, field):
  pre = tiny_pretrain_config()
  state, _ = pretrain_step.create_state(pre, models.rcm_encoder(pre.model),
                                   optim.pretrain_optimizer(pre), ONE())
  ckpt = checkpoints.Checkpointer(pretrain_dir)
  saved, _ = ckpt.restore(checkpoints.abstract_like(state))
  ckpt.close()
  copies = [jax.tree.leaves(getattr(saved, f)["vit"])[0] for f in classifier.WEIGHTS.values()]
  assert not np.array_equal(copies[0], copies[1]) and not np.array_equal(copies[1], copies[2])
  config = tiny_config(init_from=str(pretrain_dir), init_weights=weights)
  vit, info = classifier.load_pretrained_encoder(config, _abstract_params(config))
  for a, b in zip(jax.tree.leaves(vit), jax.tree.leaves(getattr(saved, field)["vit"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert info["num_scales"] == 81 and info["pretrain_step"] == 4
  # checkpoints/<step> picks that step: N(2) of a 4-step run is 41
  # (docs/method.md, Number of scales during pre-training).
  config.init_from = str(pretrain_dir / "checkpoints" / "2")
  _, info2 = classifier.load_pretrained_encoder(config, _abstract_params(config))
  assert info2["pretrain_step"] == 2 and info2["num_scales"] == schedules.num_scales(2, 4) == 41


def test_train_resume_best_checkpoints_and_load_classifier(pretrain_dir, tmp_path):
  config = tiny_config(init_from=str(pretrain_dir))
  data = ArrayData()
  straight = finetune.train(config, str(tmp_path / "a"), data=data, mesh=ONE())
  finetune.train(config, str(tmp_path / "b"), data=data, mesh=ONE(), stop_after=3)
  resumed = finetune.train(config, str(tmp_path / "b"), data=data, mesh=ONE())
  assert int(straight.step) == int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  work = tmp_path / "b"
  rows = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  assert train_rows[-1]["train_flops"] == 4 * 16 * 6 * flops.forward_flops(config.model, 4)
  assert train_rows[-1]["total_flops"] > train_rows[-1]["train_flops"]   # + pre-training
  val = [r for r in rows if "val/clean" in r]
  assert [r["step"] for r in val] == [2, 4] and {"val/noisy_0.5", "val/noisy_2.0"} <= set(val[0])
  assert any("test/last/clean" in r for r in rows)
  results = json.loads((work / "test_results.json").read_text())
  assert set(results) == {"last", "best_clean", "best_noisy_0.5", "best_noisy_1.0",
                          "best_noisy_2.0"}
  assert json.loads((work / "config.json").read_text())["num_scales"] == 81
  model, params, info = classifier.load_classifier(str(work), "best_noisy_0.5", mesh=ONE())
  assert info["num_scales"] == 81 and info["sigma"] == 0.25 and info["num_classes"] == 4
  assert info["step"] in (2, 4) and not info["final_norm"]
  _, last, _ = classifier.load_classifier(str(work), mesh=ONE())
  for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="choose one of"):
    classifier.load_classifier(str(work), "best_noisy_3.0")


def test_consistency_starts_from_a_linear_probe_with_its_trained_head(pretrain_dir, tmp_path):
  probe = tiny_config("linear", epochs=1, init_from=str(pretrain_dir))
  probe.optim.lr = 0.1
  finetune.train(probe, str(tmp_path / "probe"), data=ArrayData(), mesh=ONE())
  _, probe_params, probe_info = classifier.load_classifier(str(tmp_path / "probe"), mesh=ONE())
  config = tiny_config(init_from=str(tmp_path / "probe"))
  overrides, info = classifier.initial_params(config, _abstract_params(config))
  assert info["num_scales"] == probe_info["num_scales"] == 81
  assert info["pretrain_flops"] == probe_info["train_flops"] > 0
  for a, b in zip(jax.tree.leaves(overrides), jax.tree.leaves(probe_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(overrides["head"]["kernel"]).max()) > 1e-3   # trained, not the 2e-5 init


def test_evaluation_counts_every_example_once_whatever_the_batch():
  config = tiny_config()
  model = classifier.build_classifier(config)
  mesh = parallel.make_mesh()
  params = jax.device_put(_init_params(config), parallel.replicated(mesh))
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh), params)
  predict = classifier.level_logits_fn(model, 81, config.denoiser)
  batches = lambda size: lambda: ArrayData(num_val=13, eval_batch=size).evaluate("x")
  evaluator = accuracy.Evaluator(predict, batches(8), [0.0, 1.0], mesh, shardings)
  calls, step = [], evaluator.step
  evaluator.step = lambda p, b: calls.append(int(np.sum(np.asarray(b["mask"])))) or step(p, b)
  acc8 = dict(evaluator.run(params))
  assert sum(calls) == 13 and list(acc8) == ["clean", "noisy_1.0"]
  acc16 = dict(evaluator.with_batches(batches(16)).run(params))
  assert acc8 == pytest.approx(acc16)     # the noise of an example depends on its index only


# ----------------------------------------------------------------------------
# Configs and bad input.
# ----------------------------------------------------------------------------
def test_paper_configs():
  from configs import cifar10_finetune, imagenet_finetune
  c = cifar10_finetune.get_config("sigma=1.0")
  assert (c.epochs, c.optim.warmup_epochs, c.batch_size, c.optim.lr) == (100, 10, 1024, 2e-4)
  assert (c.optim.layer_decay, c.consistency.lam, c.optim.weight_decay) == (0.65, 20.0, 0.0)
  assert cifar10_finetune.get_config("sigma=0.25").consistency.lam == 10.0
  assert not c.final_norm and c.augment == "none" and c.model.width == 768
  assert not c.train_head and c.init_weights == "ema"      # the reference's choices
  rows = {s: imagenet_finetune.get_config(f"sigma={s}") for s in ("0.25", "0.5", "1.0")}
  assert [(r.batch_size, r.epochs, r.augment, r.optim.lr) for r in rows.values()] == [
      (1024, 150, "autoaug", 2e-4), (2048, 50, "strong", 2e-4), (256, 150, "weak", 1e-4)]
  assert all(r.final_norm and r.mixup == 0.8 and r.cutmix == 1.0 and r.optim.layer_decay == 0.65
             and r.optim.warmup_epochs == 5 for r in rows.values())
  assert [r.label_smoothing for r in rows.values()] == [0.1, 0.0, 0.0]
  with pytest.raises(ValueError, match="must be one of"):
    cifar10_finetune.get_config("sigma=0.3")
  with pytest.raises(ValueError, match="sigma"):
    cifar10_finetune.get_config(None)     # required
  assert fashion_mnist_finetune.get_config("sigma=0.5").sigma == 0.5
  fm = fashion_mnist_finetune.get_config()
  assert fm.init_weights == "ema"         # online was not better on the demo (README)
  assert fm.model.to_dict() == dict(fashion_mnist_pretrain.get_config().model.to_dict(),
                                    frozen_patch_embed=False)
  from configs import fashion_mnist_consistency_scratch, fashion_mnist_gaussian_scratch
  g, s = fashion_mnist_gaussian_scratch.get_config(), fashion_mnist_consistency_scratch.get_config()
  assert g.init_from is None and g.task == "finetune" and s.task == "consistency" and s.train_head


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: d.parent / "empty_dir", "is not a checkpoint"),
    (lambda d: "wide", "checkpoint width 32, config width 64"),
])
def test_bad_init_from_stops_before_the_workdir_is_touched(pretrain_dir, tmp_path, make, match):
  (pretrain_dir.parent / "empty_dir").mkdir(exist_ok=True)
  config = tiny_config(init_from=str(pretrain_dir))
  source = make(pretrain_dir)
  if source == "wide":
    config.model.width = 64
  else:
    config.init_from = str(source)
  with pytest.raises(ValueError, match=match):
    finetune.train(config, str(tmp_path / "w"), data=ArrayData(), mesh=ONE())
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("key,value,match", [
    ("sigma", 0.0, "config.sigma=0.0 must be > 0"),
    ("sigma", -0.5, "config.sigma=-0.5 must be > 0"),
    ("task", "distill", "config.task must be one of"),
    ("init_weights", "best", "config.init_weights must be one of"),
    ("batch_size", 12, "batch_size=12 must be divisible"),
])
def test_bad_config_is_one_sentence(key, value, match, tmp_path):
  config = tiny_config()
  config[key] = value
  with pytest.raises(ValueError, match=match):
    finetune.train(config, str(tmp_path / "w"), data=ArrayData(), mesh=parallel.make_mesh())
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_cli_bad_init_from_is_one_sentence(tmp_path):
  env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags())
  proc = subprocess.run(
      [sys.executable, "-m", "rrcm_jax.finetune", "--config=configs/fashion_mnist_finetune.py",
       f"--workdir={tmp_path / 'w'}", f"--config.init_from={tmp_path / 'nope'}",
       "--config.sigma=0.5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert f"error: config.init_from={tmp_path / 'nope'} does not exist." in proc.stderr
  assert not (tmp_path / "w").exists()
