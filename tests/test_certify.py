"""The certification CLI (rrcm_jax/certify.py): Cohen-format logs of a tiny fine-tuned
classifier, restarts that certify only the missing images, PREDICT mode, the
authors' PyTorch classifier, and bad input that stops with one sentence and
leaves existing files alone."""
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import fashion_mnist_certify, fashion_mnist_finetune
from rrcm_jax import certify, certlog, classifier, finetune, parallel

REPO = pathlib.Path(__file__).resolve().parents[1]
# The tiny classifier: the Fashion-MNIST configs with these keys changed.
TINY = {"data.name": "synthetic", "data.image_size": 8, "data.num_classes": 4,
        "model.image_size": 8, "model.patch_size": 4, "model.width": 16, "model.depth": 1,
        "model.num_heads": 2}
FAST = {"n0": 16, "n": 64, "chunk_size": 32, "subset": "first"}


def apply(config, overrides):
  """Sets dotted keys {"a.b": v} of a ConfigDict (as --config.a.b=v would)."""
  for dotted, value in overrides.items():
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
      node = node[key]
    node[last] = value
  return config


def cli_flags(overrides):
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def tiny_finetune_workdir(workdir):
  """Writes a fine-tuning workdir of a tiny classifier through rrcm_jax.finetune itself:
  synthetic data, from scratch, 60 steps of Gaussian-noise training (enough that
  the smoothed predictions, radii and abstentions differ from image to image)."""
  config = apply(fashion_mnist_finetune.get_config(), TINY)
  config.task = "finetune"
  config.epochs, config.steps_per_epoch, config.optim.warmup_epochs = 1, 60, 0
  config.optim.lr = 0.5                      # x batch/256: 0.03
  config.batch_size, config.eval_batch_size, config.eval_levels = 16, 16, (0.5,)
  config.log_every = 20
  config.data.synthetic_examples = {"train": 64, "test": 32}
  finetune.train(config, str(workdir), mesh=parallel.make_mesh(jax.devices()[:1]))
  return workdir


def tiny_certify_config(classifier, **overrides):
  """The CLI's config with TINY and FAST; `classifier` a fine-tuning workdir (or None)."""
  config = apply(fashion_mnist_certify.get_config(), TINY)
  config.init_from = None if classifier is None else str(classifier)
  return apply(config, dict(FAST, **overrides))


def rows(path):
  """The log's lines without the time column (the only field that may differ)."""
  lines = pathlib.Path(path).read_text().splitlines()
  return [line.rsplit("\t", 1)[0] for line in lines]


def shared_finetune_workdir(tmp_path_factory):
  """The tiny classifier, written once per pytest run, even across pytest-xdist workers."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent          # the run's base directory, shared by its workers
  workdir = root / "tiny_classifier"
  with open(root / "tiny_classifier.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "test_results.json").exists():   # written last by finetune.train
      shutil.rmtree(workdir, ignore_errors=True)
      tiny_finetune_workdir(workdir)
  return workdir


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
  return shared_finetune_workdir(tmp_path_factory)


@pytest.mark.slow
def test_cli_writes_cohen_log_and_report(classifier_dir, tmp_path):
  workdir = tmp_path / "certify"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"))
  proc = subprocess.run(
      [sys.executable, "-m", "rrcm_jax.certify", "--config=configs/fashion_mnist_certify.py",
       f"--workdir={workdir}", f"--config.init_from={classifier_dir}", "--config.num_images=3",
       *cli_flags(TINY), *cli_flags(FAST)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  path = workdir / "certify_sigma0.25.tsv"
  lines = path.read_text().splitlines()
  assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
  log = certlog.read_log(str(path))
  np.testing.assert_array_equal(log["idx"], [0, 1, 2])
  assert set(log["predict"]) <= {-1, 0, 1, 2, 3}
  assert np.all(log["correct"] == (log["predict"] == log["label"]))
  assert np.all(log["radius"] >= 0) and np.all((log["radius"] > 0) <= (log["predict"] >= 0))
  assert "| sigma=0.25 | 3 |" in proc.stdout                   # the report table
  assert "| sigma=0.25 | 3 |" in (workdir / "certify_sigma0.25.md").read_text()
  assert "images 3/3" in proc.stdout and "samples_s" in proc.stdout   # the progress line
  settings = json.loads((workdir / "certify_sigma0.25.json").read_text())["settings"]
  assert settings["classifier"]["source"] == str(classifier_dir)
  assert settings["classifier"]["checkpoint"] == "last"
  assert settings["classifier"]["dtype"] == "float32" and settings["n"] == 64
  recorded = json.loads((workdir / "config.json").read_text())
  assert recorded["classifier"]["source"] == str(classifier_dir)


def test_restart_certifies_only_missing_images(classifier_dir, tmp_path):
  path = tmp_path / "certify_sigma0.25.tsv"
  first = certify.run(tiny_certify_config(classifier_dir, num_images=3), str(tmp_path))
  assert (first["certified"], first["skipped"]) == (3, 0)
  before = path.read_bytes()
  # Another chunk size: the noise depends on the image index and sample only.
  result = certify.run(tiny_certify_config(classifier_dir, num_images=5, chunk_size=16),
                       str(tmp_path))
  assert (result["certified"], result["skipped"]) == (2, 3)
  after = path.read_bytes()
  assert after.startswith(before)                          # nothing rewritten
  np.testing.assert_array_equal(certlog.read_log(str(path))["idx"], [0, 1, 2, 3, 4])
  certify.run(tiny_certify_config(classifier_dir, num_images=5), str(tmp_path / "fresh"))
  assert rows(tmp_path / "fresh" / "certify_sigma0.25.tsv") == rows(path)
  again = certify.run(tiny_certify_config(classifier_dir, num_images=5), str(tmp_path))
  assert again["certified"] == 0 and path.read_bytes() == after


def test_restart_with_other_settings_is_refused(classifier_dir, tmp_path):
  certify.run(tiny_certify_config(classifier_dir, num_images=1), str(tmp_path))
  path = tmp_path / "certify_sigma0.25.tsv"
  before = path.read_bytes()
  with pytest.raises(ValueError, match="was made with n=64, this run has 128"):
    certify.run(tiny_certify_config(classifier_dir, n=128), str(tmp_path))
  with pytest.raises(ValueError, match="classifier.checkpoint='last'"):
    certify.run(tiny_certify_config(classifier_dir, checkpoint="best_clean"), str(tmp_path))
  with pytest.raises(ValueError, match="classifier.dtype='float32', this run has 'bfloat16'"):
    certify.run(tiny_certify_config(classifier_dir, dtype="bfloat16"), str(tmp_path))
  with pytest.raises(ValueError, match="config.checkpoint='best_x' is not in"):
    certify.run(tiny_certify_config(classifier_dir, checkpoint="best_x"), str(tmp_path))
  assert path.read_bytes() == before


def test_predict_mode_and_every_kth_subset(classifier_dir, tmp_path):
  config = tiny_certify_config(classifier_dir, mode="predict", subset="every", every=7,
                               num_images=3)
  certify.run(config, str(tmp_path))
  path = tmp_path / "predict_sigma0.25.tsv"
  assert path.read_text().splitlines()[0] == "idx\tlabel\tpredict\tcorrect\ttime"
  log = certlog.read_log(str(path))
  assert log["mode"] == "predict" and "radius" not in log
  np.testing.assert_array_equal(log["idx"], [0, 7, 14])


def test_torch_checkpoint_gives_the_same_log(classifier_dir, tmp_path):
  torch = pytest.importorskip("torch")
  from rrcm_jax import torch_import  # pylint: disable=g-import-not-at-top
  _, params, _ = classifier.load_classifier(str(classifier_dir))
  state_dict = torch_import.to_torch({"params": jax.device_get(params)}, kind="classifier")
  pth = tmp_path / "classifier.pth"
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}}, pth)
  certify.run(tiny_certify_config(classifier_dir, num_images=2), str(tmp_path / "ours"))
  certify.run(tiny_certify_config(None, num_images=2, torch_checkpoint=str(pth)),
              str(tmp_path / "torch"))
  assert rows(tmp_path / "torch" / "certify_sigma0.25.tsv") == rows(
      tmp_path / "ours" / "certify_sigma0.25.tsv")


@pytest.mark.parametrize("overrides, message", [
    ({"sigma": 0.0}, "config.sigma=0.0 must be a number > 0"),
    ({"sigma": -0.5}, "config.sigma=-0.5"),
    ({"alpha": 1.5}, "config.alpha must be a number in (0, 1)"),
    ({"n": 0}, "config.n must be an integer >= 1"),
    ({"n0": 0}, "config.n0 must be an integer >= 1"),
    ({"mode": "verify"}, "config.mode must be one of"),
    ({"subset": "last"}, "config.subset must be one of"),
    ({"init_from": None}, "give exactly one classifier"),
])
def test_bad_arguments_are_one_sentence(classifier_dir, tmp_path, overrides, message):
  workdir = tmp_path / "w"
  with pytest.raises(ValueError) as e:
    certify.run(apply(tiny_certify_config(classifier_dir), overrides), str(workdir))
  assert message in str(e.value) and str(e.value).count(". ") == 0
  assert not workdir.exists()


def test_other_architecture_and_wrong_workdir_are_rejected(classifier_dir, tmp_path):
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match="another architecture: checkpoint width 16, config "
                     "width 32"):
    certify.run(tiny_certify_config(classifier_dir, **{"model.width": 32}), str(workdir))
  with pytest.raises(ValueError, match="num_classes 4, but config.data.num_classes is 10"):
    certify.run(tiny_certify_config(classifier_dir, **{"data.num_classes": 10}), str(workdir))
  with pytest.raises(ValueError, match="is not a checkpoint"):
    certify.run(tiny_certify_config(tmp_path), str(workdir))
  assert not workdir.exists()


def test_existing_non_cohen_file_is_left_untouched(classifier_dir, tmp_path):
  path = tmp_path / "certify_sigma0.25.tsv"
  path.write_text("epoch\tloss\n1\t0.5\n")
  with pytest.raises(ValueError, match="is not a Cohen-format certification log"):
    certify.run(tiny_certify_config(classifier_dir), str(tmp_path))
  assert path.read_text() == "epoch\tloss\n1\t0.5\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["certify_sigma0.25.tsv"]


def test_configs_follow_the_protocols():
  from configs import cifar10_certify, imagenet_certify  # pylint: disable=g-import-not-at-top
  for module, every, split, size in ((cifar10_certify, 20, "test", 32),
                                     (imagenet_certify, 100, "validation", 224)):
    for sigma in (0.25, 0.5, 1.0):
      config = module.get_config(f"sigma={sigma}")
      assert (config.sigma, config.n0, config.n, config.alpha) == (sigma, 100, 100_000, 0.001)
      assert (config.subset, config.every, config.num_images) == ("every", every, 500)
      assert (config.data.eval_split, config.model.image_size) == (split, size)
      certify.validate_config(apply(config, {"init_from": "somewhere"}))
    with pytest.raises(ValueError, match="must be one of"):
      module.get_config("sigma=0.3")
  config = fashion_mnist_certify.get_config()
  assert (config.every, config.num_images, config.data.eval_split) == (100, 100, "test")
