"""The benchmarks' --quick modes run and write their JSON; the FLOP counts they divide by.

Figures are not asserted (the machine is shared); structure, FLOP formulas,
the absence of recompilation and the memory accounting are.
"""
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from benchmarks import matmul, memory, sampler, sampler_ratio, scaling, train_step
from rrcm_jax import flops

REPO = pathlib.Path(__file__).resolve().parents[1]
MACHINE_KEYS = {"cpu", "cores", "load_average", "backend", "device", "jax", "xla_flags"}


def read(path):
  data = json.loads(pathlib.Path(path).read_text())
  assert MACHINE_KEYS <= set(data["machine"])
  return data


def test_cifar_forward_flops_equal_a_hand_count():
  """Width 192, depth 6, 66 tokens, patch 4: 185.8 M multiply-adds with attention."""
  cfg = sampler.model_config("cifar")
  d, tokens = 192, 66
  per_block = tokens * d * (3 * d + d + 8 * d) + 2 * tokens * tokens * d
  macs = 64 * 4 * 4 * 3 * d + 6 * per_block + d * 10
  assert flops.forward_flops(cfg, 10) == 2 * macs == 371_611_392
  assert flops.training_flops("pretrain", cfg, 1) == 12 * flops.forward_flops(
      cfg, projection=True)


def test_rcmb_forward_is_35_gflop():
  forward = flops.forward_flops(sampler.model_config("rcmb"), 1000)
  assert 35.0e9 < forward < 35.6e9


def test_matmul_quick(tmp_path):
  rows = matmul.main(["--quick", "--out", str(tmp_path / "m.json")])
  data = read(tmp_path / "m.json")
  assert [r["size"] for r in data["rows"]] == [128, 256] and len(rows) == 2
  assert all(r["gflops"] > 0.1 for r in data["rows"])


def test_sampler_quick_with_profile(tmp_path):
  sampler.main(["--quick", "--profile", "--out", str(tmp_path / "s.json")])
  data = read(tmp_path / "s.json")
  assert [r["chunk"] for r in data["rows"]] == [8, 16]
  for row in data["rows"]:
    assert row["samples_per_s"] > 0 and 0 < row["fraction"] and row["forward_fraction"] > 0
    assert row["fraction_cpu"] is not None and row["fraction_of_best"] > 0
    assert row["traces"] == 1   # one chunk function, traced once for all timed calls
  profile = data["profiles"][0]
  assert abs(sum(profile["shares"].values()) - 1.0) < 1e-3
  assert "matmul (+fused LN, bias, softmax)" in profile["shares"]
  assert profile["xla_flops_per_call"] > 0.5 * profile["analytic_flops_per_call"]


def test_sampler_ratio_quick_with_ablation(tmp_path):
  rows = sampler_ratio.main(["--quick", "--ablate", "--profile", "--out", str(tmp_path / "r.json")])
  data = read(tmp_path / "r.json")
  assert len(rows) == 1 and data["rows"][0]["model"] == "tiny" and data["rows"][0]["rounds"] == 3
  for key in ("sampler", "forward", "no_count", "zero_noise", "noise"):
    assert rows[0][f"{key}_ratio"] > 0 and rows[0][f"{key}_ratio_cpu"] > 0
  assert 0 < rows[0]["noise_share"] < 1   # the noise alone is faster than noise + classifier
  assert "noise (threefry, erf-inv)" in data["profiles"][0]["shares"]
  with pytest.raises(ValueError, match="model:chunk"):
    sampler_ratio.main(["--cases", "cifar"])


def test_agreement_of_a_classifier_with_itself_is_exact(monkeypatch):
  """The agreement plumbing: float32 against float32 agrees on every noisy input."""
  cfg = sampler.model_config("tiny")
  from configs import common  # pylint: disable=g-import-not-at-top
  from rrcm_jax import classifier, models  # pylint: disable=g-import-not-at-top
  model = models.classifier(cfg, 10, False)
  params = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32), np.zeros((1,)))
  info = dict(model=cfg, num_classes=10, final_norm=False, num_scales=80,
              denoiser=common.denoiser_config(), step=7)
  monkeypatch.setattr(classifier, "load_classifier",
                      lambda *a, **k: (model, params["params"], info))
  images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  same = sampler.agreement("unused", images, np.arange(3), samples=12, chunk=8,
                           dtypes=("float32", "float32"))
  assert same["agreement"] == 1.0 and same["noisy_inputs"] == 36   # chunks of 8 and 4
  assert same["majority_votes_differ"] == 0 and same["classifier_step"] == 7
  mixed = sampler.agreement("unused", images, np.arange(3), samples=8, chunk=8)
  assert 0.0 <= mixed["agreement"] <= 1.0 and mixed["dtypes"] == ["float32", "bfloat16"]


def test_train_step_quick_with_pipeline(tmp_path):
  # One device: a pre-training step over 8 simulated CPU devices deadlocks in XLA's CPU
  # collectives when its executable comes from the persistent compilation cache.
  rows = train_step.main(["--quick", "--devices", "1", "--out", str(tmp_path / "t.json")])
  data = read(tmp_path / "t.json")
  on_device, piped = data["rows"]
  assert on_device["mode"] == "on device" and on_device["images_per_s"] > 0
  assert on_device["fraction"] > 0 and on_device["flops_per_image"] > 0
  assert on_device["peak_gb"] > 0   # the compiled step's memory analysis
  assert piped["mode"] == "with pipeline"
  assert piped.get("images_per_s", 0) > 0 or "skipped" in piped
  assert len(rows) == 2


def test_scaling_quick_compiles_once(tmp_path):
  result = scaling.main(["--quick", "--out", str(tmp_path / "c.json")])
  data = read(tmp_path / "c.json")
  assert [r["n"] for r in data["n_rows"]] == [200, 1000, 3000]
  assert [r["images"] for r in data["image_rows"]] == [1, 2]
  assert not data["recompiled"]
  assert data["traces_after_first_image"] == data["traces_at_end"]
  assert set(data["traces"].values()) == {1}   # each chunk size traced once
  assert data["n_rows"][-1]["seconds"] > data["n_rows"][0]["seconds"]
  assert result["fit_n"]["seconds_per_sample"] > 0


def test_memory_quick_fsdp_shards_the_state(tmp_path):
  memory.main(["--quick", "--out", str(tmp_path / "mem.json")])
  rows = read(tmp_path / "mem.json")["rows"]
  assert len(rows) == 2 and all(r["estimate"] for r in rows)   # CPU: always an estimate
  plain, sharded = rows
  assert not plain["fsdp"] and sharded["fsdp"] and plain["devices"] == 8
  assert sharded["state_gb"] < 0.5 * plain["state_gb"]   # 8 devices: most of it / 8
  assert sharded["peak_gb"] < plain["peak_gb"]
  assert all(r["peak_gb"] >= r["state_gb"] > 0 for r in rows)


def test_extrapolation_is_linear_in_depth():
  figures = memory.extrapolate({1: dict(peak=10.0), 2: dict(peak=13.0)}, 12)
  assert figures["peak"] == pytest.approx(43.0)


@pytest.mark.slow
def test_gpu_check_cpu_runs(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", PYTHON=sys.executable)
  env.pop("OUT", None)
  proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--out", str(tmp_path)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  data = read(tmp_path / "gpu_check.json")
  stages = data["stages"]
  assert {"matmul", "sampler_bfloat16", "sampler_float32", "train_step", "memory"} <= set(stages)
  assert all("json" in stages[k] for k in ("matmul", "sampler_float32", "train_step", "memory"))
  assert "skipped" in stages["agreement"]   # no classifier given
  assert (tmp_path / "gpu_check.log").exists()


def test_inference_cost_quick_fashion_mnist_pair(tmp_path):
  """DDS's denoise + classify costs more than rRCM's one call; XLA agrees with the ViT formula."""
  from benchmarks import inference_cost  # pylint: disable=g-import-not-at-top
  rows = inference_cost.main(["--quick", "--sampler", "--out", str(tmp_path / "ic.json")])
  data = read(tmp_path / "ic.json")
  rrcm, dds_row = data["rows"]
  assert (rrcm["method"], dds_row["method"]) == ("rRCM", "DDS")
  assert dds_row["xla_flops"] > rrcm["xla_flops"] > 0
  # The ViT's analytic matmul count (rrcm_jax.flops): XLA adds the elementwise work.
  assert abs(rrcm["xla_flops"] / rrcm["analytic_flops"] - 1) < 0.2
  assert abs(rrcm["matmul_flops"] / rrcm["analytic_flops"] - 1) < 0.02
  # DDS's classifier is the same ViT: the U-Net is the difference.
  assert dds_row["classifier_analytic_flops"] == rrcm["analytic_flops"]
  assert dds_row["matmul_flops"] > 10 * rrcm["matmul_flops"] and dds_row["ratio_matmul_flops"] > 10
  assert all(r["samples_per_s"] > 0 and r["sampler_samples_per_s"] > 0 for r in rows)
  assert dds_row["sampler_traces"] == 1   # the "clean_and_noise" chunk function, traced once
  assert "| fashion_mnist | DDS |" in data["table"]


def test_inference_cost_of_the_replication_pair_matches_the_summary_count(tmp_path):
  """The replication's arms: the benchmark's jaxpr count per noisy sample is the ViT formula
  for rRCM and, for DDS, what the replication summary charges (ViT + one tiny U-Net call)."""
  from benchmarks import inference_cost  # pylint: disable=g-import-not-at-top
  from configs import fashion_mnist_replication as rep  # pylint: disable=g-import-not-at-top
  from experiments import replication_summary  # pylint: disable=g-import-not-at-top
  from rrcm_jax import flops  # pylint: disable=g-import-not-at-top
  counts = {}
  for build in (inference_cost.build_rrcm, inference_cost.build_dds):
    spec = build("fashion_mnist_replication")
    inputs = inference_cost.chunk_inputs(spec, 2)
    counts[spec["method"]] = inference_cost.matmul_flops(spec["logits_fn"], spec["params"],
                                                         *inputs) / 2
  vit = flops.forward_flops(rep.model_config(), rep.NUM_CLASSES)
  assert counts["rRCM"] == pytest.approx(vit, rel=0.02)
  from test_figure1 import write_log  # pylint: disable=g-import-not-at-top
  charged = replication_summary.inference_flops(write_log(tmp_path, method="dds"))
  assert charged > vit and replication_summary.inference_flops(
      write_log(tmp_path / "rrcm")) == pytest.approx(vit)
  assert counts["DDS"] == pytest.approx(charged, rel=0.02)


def test_jaxpr_matmul_count_of_a_padded_conv():
  """2 per multiply-add over the full kernel (padding included: the PyTorch counters'
  convention); XLA's cost analysis leaves out the taps that fall on the padding."""
  from benchmarks import inference_cost  # pylint: disable=g-import-not-at-top
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x, w = np.ones((2, 7, 7, 8), np.float32), np.ones((3, 3, 8, 16), np.float32)
  assert inference_cost.matmul_flops(conv, x, w) == 2 * 2 * 7 * 7 * 16 * 3 * 3 * 8
  taps = (2 * 2 + 5 * 3) ** 2   # in-bounds 3×3 taps summed over a 7×7 output
  xla = inference_cost.xla_flops(jax.jit(conv).lower(x, w).compile())
  assert xla == pytest.approx(2 * 2 * 16 * 8 * taps, rel=0.01)


def test_pipeline_end_to_end_quick_compares_with_the_resident_step(tmp_path):
  from benchmarks import pipeline_end_to_end  # pylint: disable=g-import-not-at-top
  rows = pipeline_end_to_end.main(["--quick", "--out", str(tmp_path / "e.json")])
  (row,) = read(tmp_path / "e.json")["rows"]
  assert row == rows[0] | {"skipped": row["skipped"]} and row["case"] == "tiny-16"
  assert row["resident_images_per_s"] > 0 and row["device_images_per_s"] > 0
  lo, hi = row["device_ratio_range"]
  assert 0 < lo <= row["device_ratio"] <= hi   # a median of per-round ratios
  assert row["device_ratio_cpu"] > 0
  assert row["tfdata_images_per_s"] > 0 or "tfdata" in row["skipped"]
  assert row["load_average"]["min"] <= row["load_average"]["max"]
  with pytest.raises(ValueError, match="NAME-BATCH"):
    pipeline_end_to_end.case_config("fmnist")


def _write_idx(path, array):
  """An IDX file (uint8): magic 0x0000 08 ndim, big-endian int32 dims, the bytes."""
  header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
  path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_gpu_study_rejects_an_unknown_stage(tmp_path):
  proc = subprocess.run(["bash", "benchmarks/gpu_study.sh", "--cpu", "--stages", "pretrain,bogus",
                         "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 2 and "unknown stage bogus" in proc.stderr
  assert not (tmp_path / "study").exists()   # nothing written


@pytest.mark.slow
def test_gpu_study_cpu_runs_without_tensorflow(tmp_path):
  """Pre-training (device pipeline, k-NN monitor), fine-tuning and certification from IDX
  files with tensorflow, tensorflow_datasets and clu unimportable, as on the GPU host; then
  the replication stage, tiny (consistency regularization at --quick sizes, certified)."""
  blocked = tmp_path / "blocked"
  for name in ("tensorflow", "tensorflow_datasets", "clu"):
    (blocked / name).mkdir(parents=True)
    (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked')\n")
  data = tmp_path / "carry" / "fashion-mnist"
  data.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 1500), ("t10k", 500)):   # k-NN: 30-image bank, k = 20
    _write_idx(data / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
    _write_idx(data / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
  env = dict(os.environ, XLA_FLAGS="", PYTHON=sys.executable, PYTHONPATH=str(blocked))
  env.pop("OUT", None)
  out = tmp_path / "out"
  proc = subprocess.run(["bash", "benchmarks/gpu_study.sh", "--cpu", "--carry", str(tmp_path / "carry"),
                         "--out", str(out), "--stages", "pretrain,finetune,certify,replication",
                         "--replication-methods", "consistency"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  plan = json.loads((out / "study" / "plan.json").read_text())
  assert plan["total_steps"] == 12 and plan["save_every"] == 12
  metrics = [json.loads(l) for l in (out / "study" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
  assert max(m["step"] for m in metrics) == 12
  assert any(k.startswith("knn") for m in metrics for k in m)   # the monitor ran
  assert (out / "study" / "finetune" / "test_results.json").exists()
  rows = (out / "study" / "certify" / "certify_sigma0.25.tsv").read_text().splitlines()
  assert len(rows) == 1 + 5   # header + 5 images
  with tarfile.open(out / "replication.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"./summary.md", "./stages.jsonl", "./certify_consistency_sigma0.25/certify_sigma0.25.tsv",
          "./consistency_sigma0.25/metrics.jsonl"} <= names
  assert not any("checkpoints" in n for n in names)
  assert "consistency regularization" in (out / "replication_summary.md").read_text()
  assert "replication exit status 0" in (out / "gpu_study.log").read_text()
