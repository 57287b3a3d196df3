"""`--config.estimate=True`: certification and pre-training time themselves on the devices at
hand, print the bill and write nothing."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import subprocess_xla_flags
from rrcm_jax import certify, pretrain
from test_certify import REPO, TINY, cli_flags, shared_finetune_workdir, tiny_certify_config
from test_finetune import ONE, tiny_pretrain_config


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
  return shared_finetune_workdir(tmp_path_factory)


def test_certify_estimate_counts_every_sample_and_writes_nothing(classifier_dir, tmp_path, capsys):
  workdir = tmp_path / "certify"
  config = tiny_certify_config(classifier_dir, num_images=6, estimate=True)
  result = certify.run(config, str(workdir))["estimate"]
  assert result["images"] == 6 and result["samples"] == 6 * (16 + 64)
  assert result["samples_s"] > 0 and result["seconds"] >= 6 * 64 / result["samples_s"]
  assert not workdir.exists()
  assert "estimate: certify of 6 images" in capsys.readouterr().out


def test_pretrain_estimate_covers_total_steps_and_writes_nothing(tmp_path, capsys):
  workdir = tmp_path / "pretrain"

  def batches(start):
    rng = np.random.default_rng(start)
    while True:
      yield {k: rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8) for k in ("x", "a1", "a2")}

  config = tiny_pretrain_config(total_steps=1000)
  result = pretrain.estimate(config, str(workdir), batches=batches, mesh=ONE(), steps=3)
  assert result["remaining_steps"] == 1000
  assert result["seconds"] == pytest.approx(1000 / result["steps_s"])
  assert not workdir.exists()
  assert "1,000 of 1,000 steps left" in capsys.readouterr().out


@pytest.mark.slow
def test_certify_estimate_cli(classifier_dir, tmp_path):
  workdir = tmp_path / "certify"
  proc = subprocess.run(
      [sys.executable, "-m", "rrcm_jax.certify", "--config=configs/fashion_mnist_certify.py",
       f"--workdir={workdir}", f"--config.init_from={classifier_dir}", "--config.num_images=4",
       "--config.estimate=True", *cli_flags(TINY),
       *cli_flags({"n0": 16, "n": 64, "chunk_size": 32, "subset": "first"})],
      cwd=REPO, env=dict(os.environ, XLA_FLAGS=subprocess_xla_flags(2)),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "estimate: certify of 4 images x (n0 16 + n 64) = 320 noisy samples" in proc.stdout
  assert not workdir.exists()
