"""Diffusion denoised smoothing end to end: the denoiser's trainer (exact resume, FLOPs,
schedules), the "clean" fine-tuning task, and certification with config.method="dds"
(counts independent of chunk size and devices, resumable logs naming both models,
t* and sigma_added, bad input in one sentence before anything is written)."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import subprocess_xla_flags
from configs import fashion_mnist_clean_classifier, fashion_mnist_dds_certify
from configs import fashion_mnist_diffusion
from rrcm_jax import certify, certlog, checkpoints, classifier, finetune, finetune_step, optim
from rrcm_jax import parallel, smoothing
from rrcm_jax.diffusion import __main__ as diffusion_main
from rrcm_jax.diffusion import base_classifier, dds, schedules
from rrcm_jax.diffusion import train as train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE, CLASSES = 8, 4
TINY_DATA = {"data.name": "synthetic", "data.image_size": SIZE, "data.num_classes": CLASSES}
TINY_UNET = {"unet.model_channels": 8, "unet.channel_mult": (1, 2), "unet.num_heads": 2,
             "unet.attention_resolutions": (2,), "unet.norm_groups": 4}
TINY_VIT = {"model.image_size": SIZE, "model.patch_size": 4, "model.width": 16,
            "model.depth": 1, "model.num_heads": 2}
FAST = {"n0": 16, "n": 48, "chunk_size": 16, "subset": "first"}


def apply(config, overrides):
  """Sets dotted keys {"a.b": v} of a ConfigDict (as --config.a.b=v would)."""
  for dotted, value in overrides.items():
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
      node = node[key]
    node[last] = value
  return config


def one_device():
  return parallel.make_mesh(jax.devices()[:1])


def diffusion_config(total_steps=4):
  config = apply(fashion_mnist_diffusion.get_config(), dict(TINY_DATA, **TINY_UNET))
  config.total_steps, config.batch_size = total_steps, 8
  config.optim.warmup_steps = min(2, total_steps)
  config.log_every, config.latest_every = 1, 1
  return config


def synthetic_images(batch_size):
  """start_step -> iterator of {"image": uint8 [B, 8, 8, 1]}; batch k depends only on k."""
  def batches(start_step):
    step = start_step
    while True:
      rng = np.random.default_rng(500 + step)
      yield {"image": rng.integers(0, 256, (batch_size, SIZE, SIZE, 1), dtype=np.uint8)}
      step += 1
  return batches


def train_denoiser(config, workdir, stop_after=None):
  return diffusion_main.train(config, str(workdir), batches=synthetic_images(config.batch_size),
                              mesh=one_device(), stop_after=stop_after)


@pytest.fixture(scope="module")
def denoiser_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dds") / "denoiser"
  train_denoiser(diffusion_config(total_steps=2), workdir)
  return workdir


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
  """A tiny classifier of the "clean" task, through rrcm_jax.finetune itself."""
  workdir = tmp_path_factory.mktemp("dds") / "classifier"
  config = apply(fashion_mnist_clean_classifier.get_config(), dict(TINY_DATA, **TINY_VIT))
  config.epochs, config.steps_per_epoch, config.optim.warmup_epochs = 1, 4, 0
  config.batch_size, config.eval_batch_size, config.eval_levels = 8, 8, (0.5,)
  config.data.synthetic_examples = {"train": 32, "test": 16}
  finetune.train(config, str(workdir), mesh=one_device())
  return workdir


def dds_config(denoiser, classifier_workdir, **overrides):
  config = apply(fashion_mnist_dds_certify.get_config(), dict(TINY_DATA, **TINY_VIT))
  config.dds.denoiser, config.dds.classifier = str(denoiser), str(classifier_workdir)
  return apply(config, dict(FAST, **overrides))


def sample_images(count=4):
  rng = np.random.default_rng(7)
  return [(i, rng.integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8), int(i % CLASSES))
          for i in range(count)]


def rows(path):
  """The log's lines without the time column."""
  return [line.rsplit("\t", 1)[0] for line in pathlib.Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------
# The denoiser's trainer.
# ----------------------------------------------------------------------------
def test_denoiser_resume_is_exact_and_flops_are_logged(tmp_path):
  config = diffusion_config()
  straight = train_denoiser(config, tmp_path / "a")
  train_denoiser(config, tmp_path / "b", stop_after=2)
  assert checkpoints.Checkpointer(tmp_path / "b").latest_step() == 2
  resumed = train_denoiser(config, tmp_path / "b")
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ema = jax.tree.leaves(resumed.ema_params)
  assert any(not np.array_equal(e, p) for e, p in zip(ema, jax.tree.leaves(resumed.params)))
  rows_ = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows_] == [1, 2, 3, 4]
  assert rows_[0]["lr"] == 0.0 and rows_[-1]["lr"] == pytest.approx(config.optim.lr)
  forward = train_lib.unet_forward_flops(train_lib.build_unet(config.unet), SIZE)
  assert rows_[-1]["train_flops"] == pytest.approx(4 * 8 * 3 * forward)
  assert np.isfinite(rows_[-1]["loss"]) and rows_[-1]["loss"] > 0


def test_forward_flops_count_the_convolutions():
  """The jaxpr count agrees with XLA's cost analysis (which adds the elementwise work)."""
  config = diffusion_config()
  unet = train_lib.build_unet(config.unet)
  x, t = jnp.zeros((1, SIZE, SIZE, 1)), jnp.zeros((1,))
  variables = unet.init(jax.random.key(0), x, t)
  cost = jax.jit(unet.apply).lower(variables, x, t).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ours = train_lib.unet_forward_flops(unet, SIZE)
  # XLA skips the padding's zero taps (a large share at 8 px) and adds the elementwise work.
  assert 0.75 * cost["flops"] < ours < 1.25 * cost["flops"]
  bigger = train_lib.unet_forward_flops(unet, 2 * SIZE)
  assert bigger == pytest.approx(4 * ours, rel=0.2)   # convolutions scale with the pixels


def test_debiased_ema_is_the_normalized_average_of_the_updates():
  """θ0 = 5, then weights 1 and 2 at rate 0.5: EMA 2.5 holds 0.25 of θ0; without it
  (0.25·1 + 0.5·2) / 0.75, whatever θ0 was."""
  ema = {"w": jnp.float32(0.5 * (0.5 * 5 + 0.5 * 1) + 0.5 * 2)}
  out = train_lib.debiased_ema(ema, {"w": jnp.float32(5.0)}, 0.5, 2)
  assert float(out["w"]) == pytest.approx((0.25 * 1 + 0.5 * 2) / 0.75)
  assert train_lib.debiased_ema(ema, {"w": jnp.float32(5.0)}, 0.5, 0) is ema


def test_certification_denoises_with_the_debiased_ema(tmp_path):
  config = diffusion_config(total_steps=2)
  config.ema_rate = 0.9
  state = train_denoiser(config, tmp_path / "d")
  certify_config = dds_config(tmp_path / "d", None)
  unet, _, _, record, load_unet = base_classifier.denoiser_spec(certify_config)
  loaded = load_unet(one_device())["params"]
  init = train_lib.initial_params(unet, SIZE, config.seed)
  expected = jax.tree.map(lambda e, p: (e - 0.81 * p) / 0.19, state.ema_params, init)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  assert record["step"] == 2 and record["ema_init_share"] == pytest.approx(0.81)


def test_learning_rate_warms_up_then_stays_or_decays():
  lr = lambda step, decay: float(train_lib.learning_rate(step, 1.0, 10, 110, decay))
  assert [lr(s, "constant") for s in (0, 5, 10, 60, 110)] == [0.0, 0.5, 1.0, 1.0, 1.0]
  assert lr(10, "cosine") == pytest.approx(1.0) and lr(60, "cosine") == pytest.approx(0.5)
  assert lr(110, "cosine") == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("key, value, match", [
    ("diffusion.noise_schedule", "sqrt", "noise_schedule"),
    ("unet.in_channels", 3, "in_channels"),
    ("optim.decay", "step", "decay"),
    ("ema_rate", 1.0, "ema_rate"),
])
def test_bad_denoiser_configs_stop_before_writing(tmp_path, key, value, match):
  config = apply(diffusion_config(), {key: value})
  with pytest.raises(ValueError, match=match):
    train_denoiser(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()


def test_clean_task_adds_no_noise():
  """Task "clean": the step ignores its noise key (a noisy task would not)."""
  config = apply(fashion_mnist_clean_classifier.get_config(), dict(TINY_DATA, **TINY_VIT))
  config.batch_size = 8
  mesh = one_device()
  model = classifier.build_classifier(config)
  batch = {"image": np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 1), np.uint8),
           "label": np.arange(8) % CLASSES}
  batch = parallel.global_batch(batch, mesh)
  results = {}
  for name in ("clean", "finetune"):
    task = finetune_step.TASKS[name](config)
    tx, lr_fn = optim.finetune_optimizer(config, 10, task.trains)
    step = finetune_step.make_train_step(config, model, tx, lr_fn, task, 81, mesh,
                                         finetune_step.state_layout(config, model, tx, mesh)[1])
    # The gradient (not the loss: the fresh head's logits are ~0 whatever the input).
    results[name] = [float(step(finetune_step.create_state(config, model, tx, mesh)[0], batch,
                                jax.random.key(k))[1]["grad_norm"]) for k in (0, 1)]
  assert results["clean"][0] == results["clean"][1]
  assert results["finetune"][0] != results["finetune"][1]


# ----------------------------------------------------------------------------
# Certification with method "dds".
# ----------------------------------------------------------------------------
def test_counts_do_not_depend_on_chunk_size_or_devices(denoiser_dir, classifier_dir):
  config = dds_config(denoiser_dir, classifier_dir)
  images = np.stack([im for _, im, _ in sample_images(2)])
  counts = []
  for devices, chunk in ((1, 8), (8, 32)):
    mesh = parallel.make_mesh(jax.devices()[:devices])
    logits_fn, params, num_classes, record = base_classifier.load(config, mesh)
    sampler = smoothing.Sampler(logits_fn, num_classes, config.sigma, chunk_size=chunk, mesh=mesh,
                                logits_input="clean_and_noise")
    counts.append(sampler.sample_counts(params, images, [0, 1], smoothing.ESTIMATION_STREAM, 40))
  np.testing.assert_array_equal(counts[0], counts[1])
  assert counts[0].sum(axis=1).tolist() == [40, 40]


def test_dds_log_resumes_and_names_both_models(denoiser_dir, classifier_dir, tmp_path):
  path = tmp_path / "certify_sigma0.25.tsv"
  first = certify.run(dds_config(denoiser_dir, classifier_dir, num_images=2), str(tmp_path),
                      images=sample_images(2))
  assert (first["certified"], first["skipped"]) == (2, 0)
  before = path.read_bytes()
  again = certify.run(dds_config(denoiser_dir, classifier_dir, num_images=4, chunk_size=8),
                      str(tmp_path), images=sample_images(4))
  assert (again["certified"], again["skipped"]) == (2, 2)
  assert path.read_bytes().startswith(before)
  certify.run(dds_config(denoiser_dir, classifier_dir, num_images=4), str(tmp_path / "fresh"),
              images=sample_images(4))
  assert rows(tmp_path / "fresh" / "certify_sigma0.25.tsv") == rows(path)
  settings = json.loads((tmp_path / "certify_sigma0.25.json").read_text())["settings"]
  assert settings["method"] == "dds"
  assert settings["denoiser"]["source"] == str(denoiser_dir) and settings["denoiser"]["step"] == 2
  assert settings["classifier"]["source"] == str(classifier_dir)
  assert settings["classifier"]["step"] == 4 and settings["classifier"]["checkpoint"] == "last"
  alpha_bar = schedules.alphas_cumprod("cosine", 1000)
  assert settings["dds"]["t_star"] == schedules.dds_timestep(0.25, alpha_bar)
  assert settings["dds"]["sigma_added"] == pytest.approx(schedules.dds_sigma_added(0.25, alpha_bar))
  assert settings["dds"]["sigma_added"] >= settings["sigma"] == 0.25
  assert "DDS: denoiser" in (tmp_path / "certify_sigma0.25.md").read_text()
  log = certlog.read_log(str(path))
  assert np.all(log["correct"] == (log["predict"] == log["label"]))


def test_other_denoiser_is_refused_on_restart(denoiser_dir, classifier_dir, tmp_path):
  certify.run(dds_config(denoiser_dir, classifier_dir, num_images=1), str(tmp_path),
              images=sample_images(1))
  other = tmp_path / "denoiser_b"
  train_denoiser(diffusion_config(total_steps=1), other)
  with pytest.raises(ValueError, match="denoiser"):
    certify.run(dds_config(other, classifier_dir, num_images=2), str(tmp_path),
                images=sample_images(2))


@pytest.mark.parametrize("overrides, match", [
    ({"method": "ddpm"}, "config.method must be one of"),
    ({"sigma": 1e5}, "schedule of 1000 steps reaches model-space noise"),
    ({"data.channels": 3}, "denoises 1-channel images"),
    ({"data.image_size": 16}, "of size 8"),
    ({"data.num_classes": 5}, "into 4 classes"),
    ({"dds.classifier": "hf_vit_b16_cifar10"}, "3-channel images into 10 classes"),
    ({"dds.denoiser": None}, "config.dds.denoiser must name"),
    ({"init_from": "x"}, "name the models in config.dds"),
])
def test_bad_input_is_one_sentence_before_writing(denoiser_dir, classifier_dir, tmp_path,
                                                  overrides, match):
  config = dds_config(denoiser_dir, classifier_dir, **overrides)
  with pytest.raises(ValueError, match=match):
    certify.run(config, str(tmp_path / "w"), images=sample_images(1))
  assert not (tmp_path / "w").exists()


def test_public_denoiser_presets_fit_their_data():
  """The public .pt presets: CIFAR-10 at 32, guided-diffusion's at 256 and at DDS's 224 crops."""
  assert dds.DDS_PRESETS["cifar10_uncond_50M_500K"]["image_size"] == 32
  assert 224 in base_classifier.EXTRA_SIZES["256x256_diffusion_uncond"]
  unet, step = dds.preset_unet_and_step("fashion_mnist_tiny", 0.25)
  assert unet.norm_groups == 8 and step.sigma_added >= 0.25


@pytest.mark.slow
def test_cli_certifies_with_dds(denoiser_dir, classifier_dir, tmp_path):
  workdir = tmp_path / "certify"
  flags = {**TINY_DATA, **TINY_VIT, **FAST, "num_images": 2, "dds.denoiser": denoiser_dir,
           "dds.classifier": classifier_dir}
  env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(2), PYTHONUNBUFFERED="1")
  proc = subprocess.run(
      [sys.executable, "-m", "rrcm_jax.certify", "--config=configs/fashion_mnist_dds_certify.py",
       f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in flags.items()]],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "| sigma=0.25 | 2 |" in proc.stdout and "DDS: denoiser" in proc.stdout
  settings = json.loads((workdir / "certify_sigma0.25.json").read_text())["settings"]
  assert settings["method"] == "dds" and settings["dds"]["t_star"] > 0
  bad = subprocess.run(
      [sys.executable, "-m", "rrcm_jax.certify", "--config=configs/fashion_mnist_dds_certify.py",
       f"--workdir={tmp_path / 'bad'}", "--config.method=ddpm"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "config.method must be one of" in bad.stderr
  assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_denoiser_cli_survives_sigterm_and_resumes(tmp_path):
  workdir = tmp_path / "w"
  flags = {**TINY_DATA, **TINY_UNET, "batch_size": 8, "optim.warmup_steps": 0, "log_every": 1}
  args = [sys.executable, "-m", "rrcm_jax.diffusion", "--config=configs/fashion_mnist_diffusion.py",
          f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in flags.items()]]
  # One device (no collectives), so a persistent compilation cache is safe here: the
  # resumed run loads the step the first one compiled (the constant learning rate leaves
  # total_steps out of the program) instead of compiling the U-Net again.
  env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(), PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
  proc = subprocess.Popen(args + ["--config.total_steps=100000"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "step 3/" in line:
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 75, "".join(lines) + out
  step = checkpoints.Checkpointer(workdir).latest_step()
  assert step is not None and step >= 3
  proc = subprocess.run(args + [f"--config.total_steps={step + 2}",
                                "--config.allow_changes=total_steps"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f"resuming at step {step}" in proc.stdout
  rows_ = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows_[-1]["step"] == step + 2 and rows_[-1]["train_flops"] > 0
