"""The replication experiment: its configs, its equal FLOP budgets, the ViT's size, the
stage plan, where its data comes from, and --quick runs end to end (with a resuming re-run,
then the controlled runs, experiments.controls, on top of it; and one from IDX files with
TensorFlow unimportable, as on the GPU host)."""
import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

import pytest
from conftest import subprocess_xla_flags

from configs import fashion_mnist_consistency_scratch, fashion_mnist_gaussian_scratch
from configs import fashion_mnist_replication as rep
from experiments import budgets
from experiments import controls
from experiments import replication
from experiments import replication_data
from rrcm_jax.data import arrays as arrays_lib
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


@pytest.mark.parametrize("init", rep.INITS)
def test_rrcm_start_sets_init_weights(init):
  config = rep.get_config(f"stage=rrcm,sigma=0.25,init={init}")
  assert config.init_weights == init
  assert rep.get_config("stage=rrcm,sigma=0.25").init_weights == "ema"   # the default start


@pytest.mark.parametrize("arg", ["", "stage=pretrain,sigma=0.25", "stage=rrcm", "stage=rrcm,sigma=0.3",
                                 "stage=gaussian,sigma=0.25,init=ema", "stage=rrcm,sigma=0.25,init=target",
                                 "stage=certify,sigma=0.25,scale=4", "stage=pretrain,scale=3",
                                 "stage=clean", "stage=denoiser,share=0.3",
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


def fake_finetune(workdir, val, flops_per_epoch=None):
  """A complete fine-tuning workdir: one validation record per value of `val` (dicts of
  metric -> accuracy) and test_results.json."""
  workdir.mkdir(parents=True)
  rows = []
  for epoch, v in enumerate(val, start=1):
    if flops_per_epoch:
      rows.append(dict(step=epoch, train_flops=epoch * flops_per_epoch))
    rows.append(dict({f"val/{k}": a for k, a in v.items()}, step=epoch, epoch=epoch))
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (workdir / "test_results.json").write_text(json.dumps({"last": {"clean": 0.5}}))


def test_plan_order_workdirs_and_choices():
  stages = replication.plan("/r", [0.25, 0.5], list(replication.ARMS), quick=False,
                            data="fashion_mnist", scales=[4], init="online", share=0.25,
                            prepare=True)
  names = [s.name for s in stages]
  by = {s.name: s for s in stages}
  inits = [f"rrcm_{i}_sigma0.25" for i in rep.INITS]
  assert names[:5] == ["prepare", "pretrain"] + inits and names.count("pretrain") == 1
  assert by["prepare"].argv()[1:] == ["-m", "rrcm_jax.data.prepare", "fashion_mnist"]
  for i in rep.INITS:   # every start fine-tuned from the one pre-training
    assert by[f"rrcm_{i}_sigma0.25"].init_from == "/r/pretrain"
    assert f"--config=configs/fashion_mnist_replication.py:stage=rrcm,sigma=0.25,init={i}" in (
        by[f"rrcm_{i}_sigma0.25"].argv())
  # the chosen start downstream: σ = 0.5 after every start at 0.25, and both certifications
  assert max(names.index(n) for n in inits) < names.index("rrcm_online_sigma0.5")
  assert by["rrcm_online_sigma0.5"].arg == "stage=rrcm,sigma=0.5,init=online"
  assert by["rrcm_online_sigma0.5"].workdir == "/r/rrcm_online_sigma0.5"
  for sigma in (0.25, 0.5):
    cert = by[f"certify_rrcm_online_sigma{sigma}"]
    assert cert.init_from == f"/r/rrcm_online_sigma{sigma}"
    assert cert.workdir == f"/r/certify_rrcm_online_sigma{sigma}"
    for method in rep.METHODS[1:]:
      assert names.index(f"{method}_sigma{sigma}") < names.index(f"certify_{method}_sigma{sigma}")
      assert "init=" not in by[f"{method}_sigma{sigma}"].arg
  assert not any(n.startswith(("rrcm_ema_sigma0.5", "certify_rrcm_ema_")) for n in names)
  # DDS: the three classifiers, the denoiser on the rest of the budget, certified per σ
  dds = [n for n in names if "dds" in n]
  assert dds == ["dds_classifier_share0.125", "dds_classifier_share0.25", "dds_classifier_share0.5",
                 "dds_denoiser_share0.75", "certify_dds_sigma0.25", "certify_dds_sigma0.5"]
  assert by["dds_denoiser_share0.75"].module == "rrcm_jax.diffusion"
  assert by["dds_denoiser_share0.75"].arg == "stage=denoiser,share=0.25"
  assert by["dds_classifier_share0.25"].arg == "stage=clean,share=0.25"
  argv = by["certify_dds_sigma0.5"].argv()
  assert "--config=configs/fashion_mnist_replication.py:stage=dds_certify,sigma=0.5" in argv
  assert "--config.dds.denoiser=/r/dds_denoiser_share0.75" in argv
  assert "--config.dds.classifier=/r/dds_classifier_share0.25" in argv
  # the 4× point last, at the last σ
  x4 = ["pretrain_x4", "rrcm_online_x4_sigma0.5", "certify_rrcm_online_x4_sigma0.5",
        "consistency_x4_sigma0.5", "certify_consistency_x4_sigma0.5"]
  assert names[-5:] == x4
  assert by["rrcm_online_x4_sigma0.5"].init_from == "/r/pretrain_x4"
  assert by["rrcm_online_x4_sigma0.5"].arg == "stage=rrcm,sigma=0.5,init=online,scale=4"
  assert by["pretrain_x4"].config().total_steps == 4 * rep.SIZES[False].pretrain_steps
  # before the choices: no stage that needs them
  pending = [s.name for s in replication.plan("/r", [0.25, 0.5], list(replication.ARMS), False,
                                              "fashion_mnist", [4, 16])]
  assert not any(n.startswith(("certify_rrcm", "rrcm_online_sigma0.5", "rrcm_online_x"))
                 or "denoiser" in n or "certify_dds" in n for n in pending)
  assert pending[-2:] == ["consistency_x16_sigma0.5", "certify_consistency_x16_sigma0.5"]
  only = [s.name for s in replication.plan("/r", [0.5], ["gaussian"], quick=True, data="synthetic",
                                          prepare=True)]
  assert only == ["gaussian_sigma0.5", "certify_gaussian_sigma0.5"]
  # one start tried: no other start's fine-tuning, and no preparation unless asked for
  one = [s.name for s in replication.plan("/r", [0.25], ["rrcm"], False, "fashion_mnist",
                                         inits=("ema",))]
  assert one == ["pretrain", "rrcm_ema_sigma0.25"]


def test_init_choice_is_the_best_validation_at_2_sigma(tmp_path):
  accs = {"ema": 0.70, "online": 0.78, "ema_debiased": 0.74}
  for i, a in list(accs.items())[:2]:
    # val/noisy_0.5 decides at σ = 0.25 (the last record, the certified checkpoint);
    # clean accuracy points the other way and must not matter
    fake_finetune(tmp_path / f"rrcm_{i}_sigma0.25",
                  [{"clean": 0.9, "noisy_0.5": 0.99}, {"clean": 1 - a, "noisy_0.5": a}])
  assert replication.choose_init(str(tmp_path), 0.25) == (None, {"ema": 0.70, "online": 0.78})
  fake_finetune(tmp_path / "rrcm_ema_debiased_sigma0.25", [{"clean": 0.1, "noisy_0.5": 0.74}])
  assert replication.choose_init(str(tmp_path), 0.25) == ("online", accs)
  args = replication.parse_args(["--root", str(tmp_path), "--methods", "rrcm"])
  names = [s.name for s in replication.current_plan(str(tmp_path), args)]
  assert "rrcm_online_sigma0.5" in names and "certify_rrcm_online_x4_sigma0.5" in names


def test_one_start_is_chosen_once_its_fine_tuning_is_complete(tmp_path):
  fake_finetune(tmp_path / "rrcm_online_sigma0.5", [{"noisy_1.0": 0.6}])
  assert replication.choose_init(str(tmp_path), 0.5, ("online",)) == ("online", {"online": 0.6})
  assert replication.choose_init(str(tmp_path), 0.5) == (None, {"online": 0.6})   # all three
  args = replication.parse_args(["--root", str(tmp_path), "--sigmas", "0.5", "--inits", "online",
                                 "--methods", "rrcm", "--budget-scales", "none"])
  assert args.inits == ["online"] and replication.starts(args) == ("online",)
  names = [s.name for s in replication.current_plan(str(tmp_path), args)]
  assert "certify_rrcm_online_sigma0.5" in names and "rrcm_ema_sigma0.5" not in names
  assert replication.parse_args(["--root", "x", "--inits", "online,ema"]).inits == ["ema", "online"]


def write_idx_folder(folder, sizes=(("train", 700), ("t10k", 300))):
  """Fashion-MNIST-shaped IDX files (gzip) of random pixels and labels: enough for the quick
  splits (train[:512], train[512:640], test[:256])."""
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for prefix, n in sizes:
    for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))),
                        ("labels-idx1", rng.integers(0, 10, n))):
      header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
      with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
  return folder


def test_idx_files_make_the_tfds_preparation_unneeded(tmp_path, monkeypatch):
  idx = write_idx_folder(tmp_path / "idx", sizes=(("train", 2), ("t10k", 2)))
  args = replication.parse_args(["--root", "r", "--arrays", str(idx), "--quick"])
  assert replication_data.data_source(args) == ("device", "idx", str(idx))
  assert replication_data.data_overrides(args) == [f"--config.data.arrays={idx}"]
  assert "prepare" not in [s.name for s in replication.current_plan(str(tmp_path / "r"), args)]
  # neither --arrays nor Debian's folder: TFDS reads Fashion-MNIST, prepared first
  monkeypatch.setitem(arrays_lib.DEBIAN_FOLDERS, "fashion_mnist", str(tmp_path / "absent"))
  args = replication.parse_args(["--root", "r", "--quick"])
  assert replication_data.reads_tfds(args) and replication_data.data_overrides(args) == []
  assert replication.current_plan(str(tmp_path / "r"), args)[0].name == "prepare"
  args = replication.parse_args(["--root", "r", "--data", "synthetic"])
  assert not replication_data.reads_tfds(args)
  assert replication_data.data_overrides(args) == ["--config.data.name=synthetic"]


def test_missing_data_is_one_sentence_before_writing(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(arrays_lib.DEBIAN_FOLDERS, "fashion_mnist", str(tmp_path / "absent"))
  monkeypatch.setattr(replication_data, "tfds_importable", lambda: False)
  root = tmp_path / "root"
  assert replication.main(["--root", str(root), "--quick"]) == 2
  err = capsys.readouterr().err
  assert "--arrays DIR" in err and "TensorFlow Datasets" in err and "t10k-labels" in err
  (tmp_path / "empty").mkdir()
  assert replication.main(["--root", str(root), "--arrays", str(tmp_path / "empty")]) == 2
  assert "is neither an .npz file, a folder of MNIST-style IDX files" in capsys.readouterr().err
  assert not root.exists()
  with pytest.raises(SystemExit):
    replication.parse_args(["--root", "x", "--data", "synthetic", "--arrays", str(tmp_path)])
  with pytest.raises(SystemExit):
    replication.parse_args(["--root", "x", "--inits", "ema,target"])
  err = capsys.readouterr().err
  assert "--arrays is for --data fashion_mnist" in err and "--inits must be" in err


def test_share_choice_is_where_clean_accuracy_saturates(tmp_path):
  for share, acc in zip(rep.CLEAN_SHARES, (0.80, 0.868, 0.871)):
    fake_finetune(tmp_path / f"dds_classifier_share{share}", [{"clean": acc}])
  share, values = replication.choose_share(str(tmp_path))
  assert share == 0.25 and values[0.5] == 0.871     # 0.868 is within 0.005 of the best


def test_dds_arm_spends_the_budget():
  budget = budgets.budget_flops()
  for quick in (False, True):
    for share in rep.CLEAN_SHARES:
      assert rep.DDS_STEPS[quick][share] == budgets.dds_schedule(share, quick)
      classifier, denoiser = budgets.dds_flops(share, quick)
      if not quick:
        assert classifier + denoiser == pytest.approx(budget, rel=0.005)
        assert classifier == pytest.approx(share * budget, rel=0.005)
  config = rep.get_config("stage=clean,share=0.25")
  assert config.task == "clean" and config.init_from is None
  assert config.epochs * config.steps_per_epoch == rep.DDS_STEPS[False][0.25][0]
  denoiser = rep.get_config("stage=denoiser,share=0.25")
  assert denoiser.total_steps == rep.DDS_STEPS[False][0.25][1]
  assert denoiser.data.train_split == "train[:90%]" and denoiser.seed == rep.SEED
  cert = rep.get_config("stage=dds_certify,sigma=0.25")
  assert cert.method == "dds" and cert.every == 200 and cert.num_images == 50
  assert (cert.n0, cert.n, cert.alpha) == (100, 10_000, 0.001)


def test_two_accountings_of_shared_training():
  pre = budgets.pretrain_flops()
  own = budgets.method_flops("rrcm") - pre
  charged = budgets.per_sigma_flops(own, pre, served=2)
  assert charged["full"] == pytest.approx(budgets.budget_flops())
  assert charged["once"] == pytest.approx(own + pre / 2)
  assert charged["once"] < charged["full"]
  assert budgets.per_sigma_flops(5.0, 0.0, served=2) == dict(full=5.0, once=5.0)
  with pytest.raises(ValueError, match="at least one"):
    budgets.per_sigma_flops(own, pre, served=0)


@pytest.mark.parametrize("scale", [4, 16])
def test_scaled_points_spend_the_multiple_of_the_budget(scale):
  budget = budgets.budget_flops()
  for method in replication.SCALED_METHODS:
    assert budgets.scaled_flops(method, scale) == pytest.approx(scale * budget, rel=0.01)
  assert budgets.scaled_flops("rrcm", 1) == pytest.approx(budget)
  config = rep.get_config(f"stage=pretrain,scale={scale}")
  assert config.total_steps == scale * rep.SIZES[False].pretrain_steps


def test_bad_options_are_one_sentence(capsys):
  for argv in (["--root", "x", "--methods", "rrcm,cohen"], ["--root", "x", "--sigmas", "0.3"],
               ["--root", "x", "--budget-scales", "3"]):
    with pytest.raises(SystemExit):
      replication.parse_args(argv)
  err = capsys.readouterr().err
  assert "--sigmas must be" in err and "--budget-scales must be" in err
  args = replication.parse_args(["--root", "x", "--budget-scale", "4,16"])
  assert args.budget_scales == [4, 16] and args.methods == list(replication.ARMS)


def run_quick(root, module="experiments.replication", *flags):
  env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(), PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"))
  flags = flags or ("--sigmas=0.25", "--methods=rrcm", "--budget-scales=none")
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
  inits = ("ema", "online")      # two starts exercise the choice; the plan tests cover all three
  flags = ("--sigmas=0.25", "--methods=rrcm", "--budget-scales=none", f"--inits={','.join(inits)}")
  proc = run_quick(root, "experiments.replication", *flags)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = [json.loads(line) for line in (root / "stages.jsonl").read_text().splitlines()]
  done = {r["stage"]: r for r in records if r["status"] == "done"}
  init, values = replication.choose_init(str(root), 0.25, inits)
  assert init in inits and values[init] == max(values.values())
  assert set(done) == ({"pretrain", f"certify_rrcm_{init}_sigma0.25"} |
                       {f"rrcm_{i}_sigma0.25" for i in inits})
  assert all(r["seed"] == 0 and r["wall_s"] > 0 for r in done.values())
  assert done["rrcm_online_sigma0.25"]["command"].startswith(
      "python -m rrcm_jax.finetune "
      "--config=configs/fashion_mnist_replication.py:stage=rrcm,sigma=0.25,init=online,quick=True")
  saved = json.loads((root / "rrcm_online_sigma0.25" / "config.json").read_text())
  assert saved["init_weights"] == "online"
  summary = (root / "summary.md").read_text()
  assert "## σ = 0.25" in summary and "| r = 1.5 | ACR |" in summary
  assert f"| rRCM ({init} start) | 3 |" in summary and f"Chosen: **{init}**." in summary
  assert "## Training FLOPs under two accountings" in summary
  assert "pending" not in summary
  assert (root / "certified_sigma0.25.png").stat().st_size > 0
  assert (root / "figure1.png").stat().st_size > 0

  # everything complete: every stage skipped, the summary rewritten
  again = run_quick(root, "experiments.replication", *flags)
  assert again.returncode == 0, again.stderr[-3000:]
  records = [json.loads(line) for line in (root / "stages.jsonl").read_text().splitlines()]
  assert [r["status"] for r in records[-len(done):]] == ["skipped"] * len(done)
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
          or line.startswith("| finetune_10ep |")]
  assert len(rows) == 2 and all("–" not in row for row in rows), rows


def blocked_packages(folder, marker):
  """Packages tensorflow, tensorflow_datasets and clu whose import fails: on PYTHONPATH they
  stand for a machine without them, like the GPU host. An attempt to import TensorFlow or
  TFDS is noted in `marker` (CLU is optional: its TensorBoard writers are skipped)."""
  for name in ("tensorflow", "tensorflow_datasets", "clu"):
    (folder / name).mkdir(parents=True)
    note = "" if name == "clu" else f"open({str(marker)!r}, 'a').write('{name}\\n')\n"
    (folder / name / "__init__.py").write_text(f"{note}raise ImportError('{name} is blocked')\n")
  return folder


@pytest.mark.slow
def test_quick_run_from_idx_files_without_tensorflow(tmp_path):
  """Pre-training, rRCM from one start, consistency regularization, both certified, the
  summary and its figures: no stage tries to import TensorFlow or TFDS, no TFDS preparation."""
  idx, marker, root = write_idx_folder(tmp_path / "idx"), tmp_path / "imported", tmp_path / "r"
  blocked = blocked_packages(tmp_path / "blocked", marker)
  env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(), PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"),
             PYTHONPATH=os.pathsep.join(filter(None, [str(blocked), os.environ.get("PYTHONPATH")])))
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.replication", f"--root={root}", "--quick",
       "--data=fashion_mnist", f"--arrays={idx}", "--methods=rrcm,consistency", "--inits=ema",
       "--sigmas=0.25", "--budget-scales=none"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert not marker.exists(), marker.read_text()
  records = [json.loads(line) for line in (root / "stages.jsonl").read_text().splitlines()]
  assert records[0]["stage"] == "prepare" and records[0]["status"] == "skipped"
  assert f"idx files in {idx}" in records[0]["reason"]
  done = {r["stage"]: r for r in records if r["status"] == "done"}
  assert set(done) == {"pretrain", "rrcm_ema_sigma0.25", "consistency_sigma0.25",
                       "certify_rrcm_ema_sigma0.25", "certify_consistency_sigma0.25"}
  assert all(r["command"].endswith(f"--config.data.arrays={idx}") for r in done.values())
  summary = (root / "summary.md").read_text()
  assert "Chosen: **ema**." in summary and "| rRCM (ema start) | 3 |" in summary
  assert f"| {replication.LABELS['consistency']} | 3 |" in summary
  for plot in ("certified_sigma0.25.png", "figure1.png"):
    assert (root / plot).stat().st_size > 0


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


STOPPING_DRIVER = """
import signal, sys
from experiments import replication

class Stage(replication.Stage):
  def argv(self, overrides=()):   # stops 1 s after SIGTERM with the CLIs' "checkpointed" status
    return [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, "
            "lambda *a: (time.sleep(1), sys.exit(75))); print('ready', flush=True); time.sleep(60)"]

def on_term(*unused):
  raise replication.Interrupted("SIGTERM")
signal.signal(signal.SIGTERM, on_term)
try:
  replication.run_stage(sys.argv[1], Stage("sleeper", "none"), [], None,
                        complete=lambda: False)
except replication.Interrupted as e:
  print(e)
"""


def test_a_repeated_sigterm_still_records_the_stopped_stage(tmp_path):
  """`timeout` signals the driver and then its whole process group: the second SIGTERM,
  arriving while the stage stops, must not cut the driver short."""
  proc = subprocess.Popen([sys.executable, "-c", STOPPING_DRIVER, str(tmp_path)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True, start_new_session=True)
  while proc.stdout.readline().strip() != "ready":   # the stage runs, its handler set
    assert proc.poll() is None
  os.killpg(proc.pid, signal.SIGTERM)   # the driver and its stage
  time.sleep(0.3)
  os.kill(proc.pid, signal.SIGTERM)     # the driver again, while the stage stops
  out, _ = proc.communicate(timeout=60)
  assert "interrupted during sleeper" in out
  statuses = [r["status"] for r in replication.read_records(str(tmp_path))]
  assert statuses == ["started", "interrupted"]


def test_stages_table_shows_commands_relative_to_the_repository():
  record = dict(stage="pretrain", status="done", seed=0, wall_s=60.0,
                command=f"python -m rrcm_jax.pretrain --workdir={REPO}/results/replication/pretrain")
  lines = replication.stages_table([record], replication.stage_walls([record]))
  assert lines[-1] == ("| pretrain | done | 1.0 | 0 | `python -m rrcm_jax.pretrain "
                       "--workdir=results/replication/pretrain` |")


def test_summary_tells_the_earlier_pretraining_from_the_current(tmp_path):
  from experiments import replication_summary   # pylint: disable=g-import-not-at-top
  (tmp_path / "pretrain").mkdir()
  (tmp_path / "pretrain" / "runs.jsonl").write_text(
      json.dumps({"time": "2026-11-30 05:27:25"}) + "\n")
  records = [dict(stage="pretrain", status="started", time="2026-11-26 12:54:25"),
             dict(stage="pretrain", status="done", time="2026-11-26 13:12:17", wall_s=1073.0),
             dict(stage="pretrain", status="started", time="2026-11-30 05:27:24"),
             dict(stage="pretrain", status="done", time="2026-11-30 06:00:00", wall_s=1900.0)]
  labelled = replication_summary.label_earlier(records, str(tmp_path))
  assert [r["stage"] for r in labelled] == ["pretrain (earlier)"] * 2 + ["pretrain"] * 2
  assert replication_summary.pretrain_walls(str(tmp_path), records) == (1900.0, 1073.0)


def test_long_pretraining_is_named_with_its_commands_until_it_runs(tmp_path):
  from experiments import replication_summary as summary  # pylint: disable=g-import-not-at-top
  lines = "\n".join(summary.long_section(str(tmp_path), quick=False))
  steps, batch = summary.LONG_STEPS, summary.LONG_BATCH
  epochs = steps * batch / budgets.DEMO_TRAIN_EXAMPLES
  assert f"({epochs:,.0f} epochs)" in lines and "Not run yet" in lines
  assert f"--config.total_steps={steps}" in lines and f"--config.batch_size={batch}" in lines
  for sigma in rep.SIGMAS:   # fine-tuned and certified at every σ of the study
    assert f"stage=certify,sigma={sigma}" in lines
  long_dir = tmp_path / summary.LONG_WORKDIR
  long_dir.mkdir()
  row = {"step": 3750, "knn/online/clean": 0.8125, "knn/online/noisy_0.5": 0.625,
         "knn/online/noisy_1.0": 0.5, "knn/ema/clean": 0.75, "knn/ema/noisy_0.5": 0.5,
         "knn/ema/noisy_1.0": 0.375}
  (long_dir / "metrics.jsonl").write_text(json.dumps({"step": 50, "loss": 1.0}) + "\n" +
                                          json.dumps(row) + "\n")
  lines = "\n".join(summary.long_section(str(tmp_path), quick=False))
  assert "Not run yet" not in lines
  assert "| 3,750 | 0.812 / 0.625 / 0.500 | 0.750 / 0.500 / 0.375 |" in lines


def test_every_arm_is_also_shown_on_the_images_dds_certified(tmp_path):
  from experiments import replication_summary as summary  # pylint: disable=g-import-not-at-top
  from rrcm_jax import certlog  # pylint: disable=g-import-not-at-top
  from test_figure1 import write_log  # pylint: disable=g-import-not-at-top
  # idx, label, predict, radius, seconds: the other arm is right on 0 and 40, wrong on 20
  other = write_log(tmp_path / "other", rows=[(0, 1, 1, 0.9, 1.0), (20, 2, 3, 0.0, 1.0),
                                              (40, 3, 3, 0.6, 1.0), (60, 4, 4, 0.3, 1.0)])
  dds = write_log(tmp_path / "dds", rows=[(0, 1, 1, 0.4, 9.0), (40, 3, 0, 0.0, 9.0)],
                  method="dds")
  present = [("consistency", "consistency", other), ("dds", "DDS", dds)]
  logs = [certlog.read_log(p) for _, _, p in present]
  lines = summary.same_images_table(present, ["consistency", "DDS"], logs)
  text = "\n".join(lines)
  assert text.startswith("The same 2 images for every arm")
  row = next(line for line in lines[2].split("\n") if line.startswith("| consistency"))
  cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
  # on images 0 and 40 only: both right at r = 0, only image 0 (0.9) at r = 0.75
  assert cells[1] == "2" and cells[2] == "1.000" and cells[5] == "0.500"
  assert summary.same_images_table(present[:1], ["consistency"], logs[:1]) == []


@pytest.mark.parametrize("accuracies,edge", [((0.80, 0.85, 0.87), True),
                                             ((0.80, 0.868, 0.871), False)])
def test_a_split_at_the_edge_of_the_search_is_said(tmp_path, accuracies, edge):
  from experiments import replication_summary as summary  # pylint: disable=g-import-not-at-top
  for share, acc in zip(rep.CLEAN_SHARES, accuracies):
    fake_finetune(tmp_path / f"dds_classifier_share{share}", [{"clean": acc}])
  lines, share = summary.share_section(str(tmp_path), quick=False)
  assert share == (max(rep.CLEAN_SHARES) if edge else 0.25)
  assert ("edge of the search" in "\n".join(lines)) == edge


def test_gap_section_sets_each_larger_budget_beside_its_1x_run(tmp_path):
  from experiments import replication_summary as summary  # pylint: disable=g-import-not-at-top
  from test_figure1 import write_log  # pylint: disable=g-import-not-at-top
  root = str(tmp_path)

  def certified(name, scale, radii, complete=True):
    path = write_log(replication.certify_dir(root, name, 0.5, scale), sigma=0.5,
                     rows=[(i * 20, 1, 1, r, 1.0) for i, r in enumerate(radii)])
    if complete:
      open(path[:-len(".tsv")] + ".md", "w").close()

  assert summary.gap_section(root, 0.5, "online", [4]) == []   # nothing certified yet
  certified("rrcm_online", 1, (0.2, 0.6))
  certified("consistency", 1, (1.2, 1.2))
  certified("rrcm_online", 4, (1.0, 1.0))
  assert summary.gap_section(root, 0.5, "online", []) == []    # no larger budget asked for
  certified("consistency", 4, (1.3, 1.3), complete=False)      # still certifying: left out
  text = "\n".join(summary.gap_section(root, 0.5, "online", [4]))
  assert "| rRCM | 4× | 2 | 1.000 | 1.000 | 1.000 |" in text
  assert "| rRCM | 1× | 2 | 0.500 | 0.000 | 0.400 |" in text
  assert ("- 1×: consistency regularization minus rRCM: +0.800 ACR; certified accuracy "
          "+0.500 at r = 0.5, +1.000 at r = 1.") in text
  assert "- 4×: not certified yet: consistency regularization (the driver resumes it)." in text
  open(replication.certify_log(root, "consistency", 0.5, 4)[:-len(".tsv")] + ".md", "w").close()
  text = "\n".join(summary.gap_section(root, 0.5, "online", [4]))
  assert "- 4×: consistency regularization minus rRCM: +0.300 ACR" in text
  assert "not certified yet" not in text


def test_a_classifier_still_training_is_labelled_in_progress(tmp_path):
  from experiments import replication_summary as summary  # pylint: disable=g-import-not-at-top
  root = str(tmp_path)
  fake_finetune(tmp_path / "consistency_sigma0.5", [{"clean": 0.7, "noisy_1.0": 0.8}])
  fake_finetune(tmp_path / "rrcm_online_x4_sigma0.5", [{"clean": 0.6}, {"clean": 0.65}])
  (tmp_path / "rrcm_online_x4_sigma0.5" / "test_results.json").unlink()
  (tmp_path / "consistency_x4_sigma0.5").mkdir()       # started, nothing logged yet

  def row(label):
    return next(line for line in summary.classifier_section(root, 0.5, "online", [4], "val")
                if line.startswith(f"| {label}"))
  assert row("consistency regularization from scratch").endswith("|")
  assert "in progress" not in row("consistency regularization from scratch")
  assert row("rRCM, 4× budget").startswith(
      "| rRCM, 4× budget (in progress; last validated at step 2) | 0.650 / – |")
  assert row("consistency regularization, 4× budget").startswith(
      "| consistency regularization, 4× budget (in progress) | – / – |")
