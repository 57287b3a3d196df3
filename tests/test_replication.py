"""The replication experiment: its configs, its equal FLOP budgets, the ViT's size, the
stage plan, and a --quick run end to end (with a resuming re-run), then the controlled
runs (experiments.controls) on top of it."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import fashion_mnist_consistency_scratch, fashion_mnist_gaussian_scratch
from configs import fashion_mnist_replication as rep
from experiments import budgets
from experiments import controls
from experiments import replication
from rrcm_jax.flops import forward_flops, training_flops

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGE_OF = {"rrcm": "consistency", "gaussian": "finetune", "consistency": "consistency"}


def all_args():
  args = []
  for quick in (False, True):
    args.append(("pretrain", None, quick))
    args += [(stage, sigma, quick) for stage in ("certify",) + rep.METHODS
             for sigma in rep.SIGMAS]
  return args


@pytest.mark.parametrize("stage,sigma,quick", all_args())
def test_config_builds_for_every_arg(stage, sigma, quick):
  arg = rep.config_arg(stage, sigma, quick)
  assert rep.parse_arg(arg) == (stage, sigma, quick)
  config = rep.get_config(arg)
  assert config.seed == rep.SEED
  assert config.model.width == 128 and config.model.patch_size == 7
  if stage in rep.METHODS:
    assert config.sigma == sigma
    assert config.init_from is None    # the CLI call gives rRCM its pre-training workdir
    assert config.task == ("finetune" if stage == "gaussian" else "consistency")
    assert config.train_head   # rRCM too: a frozen 2e-5 head stalls at this size (see the config)
    assert config.optim.layer_decay == (0.75 if stage == "rrcm" else 1.0)


@pytest.mark.parametrize("arg", ["", "stage=pretrain,sigma=0.25", "stage=rrcm", "stage=rrcm,sigma=0.3",
                                 "stage=certify,sigma=0.25,fast=True", "stage=linear,sigma=0.25",
                                 "rrcm:0.25", "stage=rrcm,sigma=0.25,quick=maybe"])
def test_bad_arg_is_one_sentence(arg):
  with pytest.raises(ValueError, match="config argument"):
    rep.get_config(arg)


def test_certification_protocol():
  config = rep.get_config("stage=certify,sigma=0.5")
  assert (config.n0, config.n, config.alpha) == (100, 10_000, 0.001)
  assert config.subset == "every" and config.every == 50 and config.num_images == 200
  assert config.data.eval_split == "test" and config.sigma == 0.5 and config.mode == "certify"


def test_vit_forward_is_at_most_20m_multiply_adds():
  model = rep.get_config("stage=pretrain").model
  macs = forward_flops(model, rep.NUM_CLASSES) / 2
  assert macs <= 20e6
  assert macs == 14_589_184          # the size the config's docstring states
  assert (model.width, model.depth, model.num_heads, model.image_size, model.channels) == (
      128, 4, 4, 28, 1)


@pytest.mark.parametrize("sigma", rep.SIGMAS)
def test_every_method_gets_the_same_training_flops(sigma):
  pre = rep.get_config("stage=pretrain")
  pretrain = training_flops("pretrain", pre.model, pre.total_steps * pre.batch_size)
  flops = {}
  for method in rep.METHODS:
    config = rep.get_config(rep.config_arg(method, sigma))
    images = config.epochs * config.steps_per_epoch * config.batch_size
    flops[method] = training_flops(STAGE_OF[method], config.model, images,
                                   config.data.num_classes)
  flops["rrcm"] += pretrain
  assert max(flops.values()) / min(flops.values()) - 1 < 0.01, flops
  assert flops["rrcm"] == pytest.approx(budgets.budget_flops())
  assert pretrain > flops["rrcm"] / 2     # most of rRCM's budget is its pre-training


@pytest.mark.parametrize("quick", [False, True])
def test_baseline_steps_in_the_config_spend_the_budget(quick):
  for method in ("gaussian", "consistency"):
    config = rep.finetune_config(method, 0.25, quick)
    assert (config.epochs, config.steps_per_epoch) == budgets.scratch_schedule(method, quick)


def test_demo_baselines_spend_the_demo_budget():
  for module in (fashion_mnist_gaussian_scratch, fashion_mnist_consistency_scratch):
    config = module.get_config()
    assert (config.epochs, config.steps_per_epoch) == budgets.demo_scratch_schedule(config)
  shorter = budgets.demo_scratch_schedule(fashion_mnist_gaussian_scratch.get_config(), 300)
  assert shorter[1] < fashion_mnist_gaussian_scratch.STEPS_PER_EPOCH


def test_plan_shares_one_pretraining_and_certifies_after_training():
  stages = replication.plan("/r", [0.25, 0.5], list(rep.METHODS), quick=False,
                            data="fashion_mnist")
  names = [s.name for s in stages]
  assert names[:2] == ["prepare", "pretrain"] and names.count("pretrain") == 1
  assert len(names) == 2 + 2 * 6
  for sigma in (0.25, 0.5):
    for method in rep.METHODS:
      assert names.index(f"{method}_sigma{sigma}") < names.index(f"certify_{method}_sigma{sigma}")
  rrcm = stages[names.index("rrcm_sigma0.5")]
  assert rrcm.init_from == "/r/pretrain"
  assert "--config=configs/fashion_mnist_replication.py:stage=rrcm,sigma=0.5" in rrcm.argv()
  cert = stages[names.index("certify_gaussian_sigma0.25")]
  assert f"--config.init_from={replication.finetune_dir('/r', 'gaussian', 0.25)}" in cert.argv()
  only = [s.name for s in replication.plan("/r", [0.5], ["gaussian"], quick=True, data="synthetic")]
  assert only == ["gaussian_sigma0.5", "certify_gaussian_sigma0.5"]


def test_bad_options_are_one_sentence(capsys):
  for argv in (["--root", "x", "--methods", "rrcm,cohen"], ["--root", "x", "--sigmas", "0.3"]):
    with pytest.raises(SystemExit):
      replication.parse_args(argv)
  assert "--sigmas must be" in capsys.readouterr().err


def run_quick(root, module="experiments.replication", *flags):
  env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"))
  flags = flags or ("--sigmas=0.25", "--methods=rrcm")
  return subprocess.run(
      [sys.executable, "-m", module, f"--root={root}", *flags, "--quick", "--data=synthetic"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def test_control_plans_change_one_thing():
  plan = lambda name, certify=False: controls.stages("/c", "/r", name, certify)
  (finetune, overrides, _), = plan("no_pretrain")
  assert finetune.init_from is None and overrides == []
  assert finetune.argv()[3] == "--config=configs/fashion_mnist_replication.py:stage=rrcm,sigma=0.25"
  (finetune, overrides, _), cert = plan("finetune_10ep", certify=True)
  assert finetune.init_from == "/r/pretrain" and overrides[0] == "--config.epochs=10"
  assert cert[0].init_from == "/c/finetune_10ep_finetune" and cert[1] == []
  (pre, overrides, steps), (finetune, _, _) = plan("pretrain_4x")
  assert overrides == ["--config.total_steps=3200"] and steps == 3200
  assert finetune.init_from == pre.workdir == "/c/pretrain_4x_pretrain"
  assert plan("weak_crops")[0][1] == ["--config.data.pretrain_crop_scale=(0.35,1.0)"]
  (pre, p_over, _), (_, f_over, _), (_, c_over, _) = plan("width_192", certify=True)
  assert p_over == f_over == c_over == ["--config.model.width=192"]
  (pre, overrides, steps), _ = controls.stages("/c", "/r", "scales_11", False, quick=True,
                                               data_overrides=["--config.data.name=synthetic"])
  assert pre.arg == "stage=pretrain,quick=True" and steps == rep.SIZES[True].pretrain_steps
  assert overrides[0] == "--config.data.name=synthetic"


def test_bad_controls_are_one_sentence(capsys, tmp_path):
  with pytest.raises(SystemExit):
    controls.parse_args(["--root", "x", "--controls", "no_pretrain,bigger"])
  assert "unknown: bigger." in capsys.readouterr().err
  code = controls.main(["--root", str(tmp_path / "c"), "--replication", str(tmp_path / "none"),
                        "--controls", "finetune_10ep"])
  assert code == 2 and "has no complete pre-training" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_end_to_end_then_resumes(tmp_path):
  root = tmp_path / "replication"
  proc = run_quick(root)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = [json.loads(line) for line in (root / "stages.jsonl").read_text().splitlines()]
  done = {r["stage"]: r for r in records if r["status"] == "done"}
  assert set(done) == {"pretrain", "rrcm_sigma0.25", "certify_rrcm_sigma0.25"}
  assert all(r["seed"] == 0 and r["wall_s"] > 0 for r in done.values())
  assert done["rrcm_sigma0.25"]["command"].startswith(
      "python -m rrcm_jax.finetune "
      "--config=configs/fashion_mnist_replication.py:stage=rrcm,sigma=0.25,quick=True")
  summary = (root / "summary.md").read_text()
  assert "## σ = 0.25" in summary and "| r = 1.5 | ACR |" in summary
  assert "| rRCM (pre-training + consistency fine-tuning) | 3 |" in summary
  assert "pending" not in summary
  assert (root / "certified_sigma0.25.png").stat().st_size > 0

  again = run_quick(root)   # everything complete: every stage skipped, the summary rewritten
  assert again.returncode == 0, again.stderr[-3000:]
  records = [json.loads(line) for line in (root / "stages.jsonl").read_text().splitlines()]
  assert [r["status"] for r in records[-3:]] == ["skipped"] * 3
  assert (root / "summary.md").exists()

  other = subprocess.run([sys.executable, "-m", "experiments.replication", f"--root={root}"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
  assert other.returncode == 2 and "Use another --root" in other.stderr

  # The controlled runs on top of it: one with its own pre-training (an override), one
  # reusing the replication's; both certified.
  croot = tmp_path / "controls"
  proc = run_quick(croot, "experiments.controls", f"--replication={root}",
                   "--controls=weak_crops,finetune_10ep", "--certify")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = [json.loads(line) for line in (croot / "stages.jsonl").read_text().splitlines()]
  done = {r["stage"]: r for r in records if r["status"] == "done"}
  assert set(done) == {f"{c}_{s}" for c in ("weak_crops", "finetune_10ep")
                       for s in ("finetune", "certify")} | {"weak_crops_pretrain"}
  assert "--config.data.pretrain_crop_scale=(0.35,1.0)" in done["weak_crops_pretrain"]["command"]
  saved = json.loads((croot / "weak_crops_pretrain" / "config.json").read_text())
  assert saved["data"]["pretrain_crop_scale"] == [0.35, 1.0]
  assert json.loads((croot / "finetune_10ep_finetune" / "config.json").read_text())["epochs"] == 10
  summary = (croot / "summary.md").read_text()
  rows = [line for line in summary.splitlines() if line.startswith("| weak_crops |")
          or line.startswith("| finetune_10ep |") or line.startswith("| replication: rrcm |")]
  assert len(rows) == 3 and all("–" not in row for row in rows), rows


def test_summary_errors_warn_but_a_sigterm_while_writing_stops(monkeypatch, capsys):
  args = replication.parse_args(["--root", "x"])
  def broken(*unused):
    raise KeyError("val/clean")
  monkeypatch.setattr(replication, "write_summary", broken)
  replication.refresh_summary("x", args)
  assert "summary.md not written (KeyError" in capsys.readouterr().err
  def sigterm(*unused):
    raise replication.Interrupted("SIGTERM")
  monkeypatch.setattr(replication, "write_summary", sigterm)
  with pytest.raises(replication.Interrupted):
    replication.refresh_summary("x", args)


def test_stages_table_shows_commands_relative_to_the_repository():
  record = dict(stage="pretrain", status="done", seed=0, wall_s=60.0,
                command=f"python -m rrcm_jax.pretrain --workdir={REPO}/results/replication/pretrain")
  lines = replication.stages_table([record], replication.stage_walls([record]))
  assert lines[-1] == ("| pretrain | done | 1.0 | 0 | `python -m rrcm_jax.pretrain "
                       "--workdir=results/replication/pretrain` |")
