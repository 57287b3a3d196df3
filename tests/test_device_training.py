"""Training through the on-device input path, the k-NN monitor, the bias-corrected EMA
initialization, the monitor's plot, and the whole pipeline with TensorFlow blocked."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import subprocess_xla_flags
from configs import common, fashion_mnist_finetune, fashion_mnist_pretrain
from rrcm_jax import checkpoints, classifier, finetune, finetune_step, models, optim, parallel, plot_metrics
from rrcm_jax import pretrain, pretrain_step
from rrcm_jax.data import device

REPO = pathlib.Path(__file__).resolve().parents[1]
ONE = lambda: parallel.make_mesh(jax.devices()[:1])


def tiny_npz(path, train=64, test=24, size=8, classes=4, seed=0):
  """Class-dependent 8x8 grayscale images (a bright quadrant per class) as an .npz."""
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in (("train", train), ("test", test)):
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    half = size // 2
    for i, c in enumerate(labels):
      r, q = divmod(int(c), 2)
      images[i, r * half:(r + 1) * half, q * half:(q + 1) * half] += 180
    out[f"x_{split}"], out[f"y_{split}"] = images, labels
  np.savez(path, **out)
  return str(path)


def tiny_pretrain_config(arrays, total_steps=4, knn_every=2):
  config = common.pretrain_config(total_steps=total_steps, batch_size=16, lr=1e-3,
                                  weight_decay=0.0, warmup_divisor=4, ema_rate=0.9,
                                  target_ema_A=15)
  config.data = common.data_config("tiny", image_size=8, channels=1, num_classes=4)
  config.data.arrays = arrays
  config.model = common.model_config(width=32, depth=1, num_heads=2, patch_size=4, image_size=8,
                                     channels=1, proj_hidden=16, proj_out=8)
  config.log_every, config.latest_every, config.save_every = 2, 2, 100
  config.knn_every = knn_every
  config.knn.update(bank_split="train[:32]", query_split="test", levels=(0.0, 0.5), k=5,
                    batch_size=16)
  return config


def tiny_finetune_config(pre, **overrides):
  config = common.finetune_config(pre, sigma=0.25, epochs=1, warmup_epochs=0, batch_size=16,
                                  lr=1e-3, layer_decay=0.75)
  config.steps_per_epoch = 2
  config.eval_batch_size = 8
  config.log_every = config.latest_every = 1
  config.train_head = True
  config.update(overrides)
  return config


def _rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_pipeline_is_chosen_by_the_dataset_and_bad_choices_are_one_sentence():
  pre = fashion_mnist_pretrain.get_config()
  assert device.resolve_pipeline(pre).data.pipeline == "device"
  assert device.resolve_pipeline(fashion_mnist_finetune.get_config()).data.pipeline == "device"
  for name, expected in (("cifar10", "device"), ("mnist", "device"), ("imagenet2012", "tfdata"),
                         ("synthetic", "tfdata")):
    pre.data.name = name
    assert device.resolve_pipeline(pre).data.pipeline == expected, name
  pre.data.arrays = "/some/data.npz"              # arrays given: the device path
  assert device.resolve_pipeline(pre).data.pipeline == "device"
  ft = fashion_mnist_finetune.get_config()
  ft.augment = "autoaug"                          # tf.data only: chosen automatically...
  assert device.resolve_pipeline(ft).data.pipeline == "tfdata"
  ft.data.pipeline = "device"                     # ...and refused when forced
  with pytest.raises(ValueError, match="augment='autoaug' needs config.data.pipeline='tfdata'"):
    device.resolve_pipeline(ft)
  ft.data.pipeline = "numpy"
  with pytest.raises(ValueError, match=r"pipeline='numpy' is not one of \('device', 'tfdata'\)"):
    device.resolve_pipeline(ft)


def test_pretrain_with_knn_monitor_and_finetune_through_the_device_path(tmp_path):
  arrays = tiny_npz(tmp_path / "tiny.npz")
  pre = tiny_pretrain_config(arrays)
  state = pretrain.train(pre, str(tmp_path / "pre"), mesh=ONE())
  assert int(state.step) == 4
  rows = _rows(tmp_path / "pre")
  knn_rows = {r["step"]: r for r in rows if any(k.startswith("knn/") for k in r)}
  assert sorted(knn_rows) == [0, 2, 4]
  first = knn_rows[0]
  # At step 0 the online and EMA encoders are the initialization; pixels once, at the start.
  for level in ("clean", "noisy_0.5"):
    assert first[f"knn/online/{level}"] == first[f"knn/ema/{level}"]
    assert 0.0 <= first[f"knn/pixels/{level}"] <= 1.0
  assert first["knn/pixels/clean"] > 0.9           # the quadrants separate the classes
  assert "knn/pixels/clean" not in knn_rows[2] and "knn/ema/noisy_0.5" in knn_rows[4]
  assert knn_rows[4]["knn/seconds"] > 0
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)

  config = tiny_finetune_config(pre, init_from=str(tmp_path / "pre"), init_weights="ema_debiased")
  config.data.train_split, config.data.val_split = "train[:48]", "train[48:]"
  finetune.train(config, str(tmp_path / "ft"), mesh=ONE())
  results = json.loads((tmp_path / "ft" / "test_results.json").read_text())
  assert set(results["last"]) >= {"clean", "noisy_0.5", "noisy_1.0", "noisy_2.0", "step"}
  assert json.loads((tmp_path / "ft" / "config.json").read_text())["data"]["pipeline"] == "device"


def test_device_evaluation_counts_like_the_numpy_batches(tmp_path):
  """The accuracy evaluator takes the device pipeline's global batches as they are and
  gets the numbers of the same examples fed as per-process numpy."""
  from rrcm_jax.evaluators import accuracy  # pylint: disable=g-import-not-at-top
  arrays = tiny_npz(tmp_path / "tiny.npz", test=21)
  pre = tiny_pretrain_config(arrays)
  config = device.resolve_pipeline(tiny_finetune_config(pre))
  mesh = parallel.make_mesh()                      # 8 devices: padding and sharding matter
  data = device.ConfigData(config, mesh)
  model = classifier.build_classifier(config)
  tx, _ = optim.finetune_optimizer(config, 2, finetune_step.TASKS[config.task](config).trains)
  state, shardings = finetune_step.create_state(config, model, tx, mesh)
  predict = classifier.level_logits_fn(model, 81, config.denoiser)
  on_device = accuracy.Evaluator(predict, lambda: data.evaluate("test"), [0.0, 0.5], mesh,
                                 shardings.params)
  as_numpy = on_device.with_batches(
      lambda: ({k: np.asarray(v) for k, v in b.items()} for b in data.evaluate("test")))
  assert dict(on_device.run(state.params)) == dict(as_numpy.run(state.params))


def _random_views(start_step):
  rng = np.random.default_rng(start_step)
  while True:
    yield {k: rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8) for k in ("x", "a1", "a2")}


def _encoder_from(workdir, pre, init_weights):
  config = tiny_finetune_config(pre, init_from=str(workdir), init_weights=init_weights)
  tx, _ = optim.finetune_optimizer(config, 2, finetune_step.TASKS[config.task](config).trains)
  abstract = finetune_step.state_layout(config, classifier.build_classifier(config), tx,
                                        ONE())[0].params
  return classifier.load_pretrained_encoder(config, abstract)


def test_initial_params_are_recomputed_bit_for_bit_from_the_workdir(tmp_path):
  """lr 0: the online weights a run checkpoints are its θ₀, which fine-tuning recomputes
  from the workdir's config.json alone."""
  pre = tiny_pretrain_config(None, total_steps=1, knn_every=0)
  pre.data = common.data_config("synthetic", image_size=8, channels=1, num_classes=4)
  pre.optim.lr = 0.0
  state = pretrain.train(pre, str(tmp_path / "pre"), batches=_random_views, mesh=ONE())
  saved = checkpoints.read_config(str(tmp_path / "pre"))
  again = pretrain_step.initial_params(saved, ONE())
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_step_debiased_ema_is_the_online_weights(tmp_path):
  pre = tiny_pretrain_config(None, total_steps=1, knn_every=0)
  pre.data = common.data_config("synthetic", image_size=8, channels=1, num_classes=4)
  state = pretrain.train(pre, str(tmp_path / "pre"), batches=_random_views, mesh=ONE())
  # After T = 1 step, θ_ema = r·θ₀ + (1 − r)·θ₁: the debiased EMA is θ₁, the online weights.
  vit, info = _encoder_from(tmp_path / "pre", pre, "ema_debiased")
  assert info["pretrain_step"] == 1
  moved = False
  for a, b, e in zip(jax.tree.leaves(vit), jax.tree.leaves(state.params["vit"]),
                     jax.tree.leaves(state.ema_params["vit"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)
    moved |= not np.allclose(np.asarray(e), np.asarray(b), atol=1e-6)
  assert moved                                     # the plain EMA is not the online weights


def test_debiased_ema_removes_the_initialization_weight():
  theta0, thetas, rate = np.float64(3.0), [1.0, 2.0, 4.0], 0.8
  ema = theta0
  for t in thetas:
    ema = rate * ema + (1 - rate) * t
  got = pretrain_step.debiased_ema({"w": ema}, {"w": theta0}, rate, len(thetas))["w"]
  weights = [(1 - rate) * rate ** (len(thetas) - 1 - i) for i in range(len(thetas))]
  np.testing.assert_allclose(got, np.dot(weights, thetas) / sum(weights), rtol=1e-12)
  with pytest.raises(ValueError, match="at least one step"):
    pretrain_step.debiased_ema({"w": ema}, {"w": theta0}, rate, 0)


def test_ema_debiased_is_refused_for_a_pth():
  config = fashion_mnist_finetune.get_config()
  config.init_from, config.init_weights = "model.pth", "ema_debiased"
  with pytest.raises(ValueError, match="needs a pre-training workdir"):
    finetune_step.validate_config(config, ONE())


def test_plot_metrics_draws_the_knn_curves(tmp_path):
  rows = [dict(step=0, **{"knn/online/clean": 0.3, "knn/ema/clean": 0.3, "knn/pixels/clean": 0.7,
                          "knn/online/noisy_0.5": 0.2, "knn/pixels/noisy_0.5": 0.5}),
          dict(step=5, loss=1.0),
          dict(step=10, **{"knn/online/clean": 0.6, "knn/ema/clean": 0.5,
                           "knn/online/noisy_0.5": 0.4})]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  series = plot_metrics.knn_rows(str(tmp_path))
  assert series["knn/online/clean"] == [(0, 0.3), (10, 0.6)]
  assert plot_metrics.main([str(tmp_path), str(tmp_path / "knn.png"),
                            "--csv", str(tmp_path / "knn.csv")]) == 0
  assert (tmp_path / "knn.png").read_bytes()[:4] == b"\x89PNG"
  assert (tmp_path / "knn.csv").read_text().splitlines()[2].startswith("10,0.5000")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps(dict(step=1, loss=2.0)) + "\n")
  assert plot_metrics.main([str(tmp_path / "empty"), str(tmp_path / "x.png")]) == 2


# Runs a module as `python -m` with TensorFlow and TFDS unimportable.
NO_TF = ("import runpy, sys; sys.modules['tensorflow'] = None; "
         "sys.modules['tensorflow_datasets'] = None; module = sys.argv[1]; "
         "sys.argv = sys.argv[1:]; runpy.run_module(module, run_name='__main__', alter_sys=True)")


@pytest.mark.slow
def test_pretrain_finetune_certify_without_tensorflow(tmp_path):
  arrays = tiny_npz(tmp_path / "tiny.npz")
  tiny_model = ["--config.model.width=32", "--config.model.depth=1", "--config.model.num_heads=2",
                "--config.model.patch_size=4", "--config.model.image_size=8",
                "--config.data.image_size=8"]
  data = [f"--config.data.arrays={arrays}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=subprocess_xla_flags(2))

  def run(module, config, workdir, *flags):
    cmd = [sys.executable, "-c", NO_TF, module, f"--config={REPO}/configs/{config}",
           f"--workdir={tmp_path / workdir}", *data, *tiny_model, *flags]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out

  run("rrcm_jax.pretrain", "fashion_mnist_pretrain.py", "pre", "--config.total_steps=4",
      "--config.batch_size=16", "--config.model.proj_hidden=16", "--config.model.proj_out=8",
      "--config.knn_every=2", "--config.knn.bank_split=train[:32]",
      "--config.knn.query_split=test[:16]", "--config.knn.k=5",
      "--config.profile_start=1", "--config.profile_steps=2")
  assert any("knn/ema/clean" in r for r in _rows(tmp_path / "pre"))
  assert len(list((tmp_path / "pre" / "plugins" / "profile").glob("*/*.xplane.pb"))) == 1
  run("rrcm_jax.finetune", "fashion_mnist_finetune.py", "ft", f"--config.init_from={tmp_path / 'pre'}",
      "--config.epochs=1", "--config.steps_per_epoch=2", "--config.batch_size=16",
      "--config.eval_batch_size=8", "--config.data.val_split=train[48:]",
      "--config.data.train_split=train[:48]", "--config.optim.warmup_epochs=0")
  assert (tmp_path / "ft" / "test_results.json").exists()
  run("rrcm_jax.certify", "fashion_mnist_certify.py", "cert", f"--config.init_from={tmp_path / 'ft'}",
      "--config.n0=8", "--config.n=32", "--config.every=8", "--config.num_images=3",
      "--config.chunk_size=16")
  log = (tmp_path / "cert" / "certify_sigma0.25.tsv").read_text().splitlines()
  assert log[0].split("\t")[:4] == ["idx", "label", "predict", "radius"] and len(log) == 4
  assert [int(line.split("\t")[0]) for line in log[1:]] == [0, 8, 16]
