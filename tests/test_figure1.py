"""experiments/figure1.py: Points from certification logs, the cost table, the figure, the CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import figure1
from rrcm_jax import certify, certlog, classifier, flops, parallel
from rrcm_jax.diffusion import dds
from rrcm_jax.diffusion import train as diffusion_train
from test_certify import shared_finetune_workdir, tiny_certify_config
from test_dds_cli import diffusion_config

# (idx, label, predict, radius, seconds) of a synthetic log; predict -1 = abstain.
ROWS = [(0, 3, 3, 0.9, 2.0), (10, 1, 1, 0.3, 1.0), (20, 2, 5, 0.7, 1.25), (30, 4, -1, 0.0, 4.0),
        (40, 7, 7, 0.4, 0.5)]


def write_log(directory, rows=ROWS, sigma=0.25, n0=100, n=1000, flops=None, method=None):
  """A certify-mode log in `directory` written by certlog's writer, with its settings file."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(str(directory), f"certify_sigma{sigma}.tsv")
  settings = dict(mode="certify", sigma=sigma, n=n, n0=n0, alpha=0.001, seed=0,
                  classifier=dict(source=f"/runs/gaussian_sigma{sigma}", task="gaussian"))
  if flops is not None:
    settings["inference_flops_per_sample"] = flops
  if method is not None:
    settings["method"] = method
  certlog.check_or_write_settings(path, settings)
  with certlog.LogWriter(path) as writer:
    for idx, label, predict, radius, seconds in rows:
      writer.write(idx, label, predict, predict == label, seconds, radius=radius)
  return path


def test_load_point_counts_and_rate_from_the_rows(tmp_path):
  path = write_log(tmp_path, flops=3.5e7)
  point = figure1.load_point(path)
  correct = np.array([p == l for _, l, p, _, _ in ROWS])
  radius = np.array([r for *_, r, _ in ROWS])
  for r in (0.0, 0.25, 0.5):
    assert point.certified[r] == pytest.approx(np.mean(correct & (radius >= r)))
  assert point.certified[0.5] == pytest.approx(1 / 5)   # only image 0 (0.9); 20 is wrong
  rates = sorted((100 + 1000) / s for *_, s in ROWS)
  assert point.samples_s == pytest.approx(rates[2])
  assert (point.images, point.n0, point.n, point.sigma) == (5, 100, 1000, 0.25)
  assert point.flops_per_sample == 3.5e7
  assert point.label == "gaussian σ=0.25"
  assert point.acr == pytest.approx(np.mean(radius * correct))


def test_flops_argument_overrides_and_labels(tmp_path):
  point = figure1.load_point(write_log(tmp_path, flops=1.0, method="dds"), flops_per_sample=2e9)
  assert point.flops_per_sample == 2e9
  assert point.label == "DDS σ=0.25"
  assert figure1.load_point(point.log, label="mine").label == "mine"


def test_seconds_per_image_is_samples_over_rate(tmp_path):
  point = figure1.load_point(write_log(tmp_path))
  assert figure1.seconds_per_image(point) == pytest.approx(100_100 / point.samples_s)
  assert figure1.seconds_per_image(point, n=1000, n0=0) == pytest.approx(1000 / point.samples_s)


def test_table_and_figure(tmp_path):
  a = figure1.load_point(write_log(tmp_path / "a", flops=2e7), label="rRCM σ=0.25")
  b = figure1.load_point(write_log(tmp_path / "b", sigma=0.5), label="DDS σ=0.5")
  table = figure1.markdown_table([a, b], radii=(0.25, 0.5, 0.8))
  assert "rRCM σ=0.25" in table and "DDS σ=0.5" in table
  assert "| 0.02 |" in table and "| - |" in table   # GFLOP, and unknown FLOPs
  assert f"{figure1.certified_at(a, 0.8):.3f}" == "0.200"   # read back from the log
  written = figure1.draw([a, b], str(tmp_path / "fig" / "figure1.png"))
  assert [os.path.splitext(p)[1] for p in written] == [".png", ".pdf"]
  with open(written[0], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(written[1]) > 0


def test_a_crowded_figure_leaves_the_naming_to_the_legend(tmp_path, monkeypatch):
  from matplotlib.axes import Axes  # pylint: disable=g-import-not-at-top
  notes = []
  annotate = Axes.annotate
  monkeypatch.setattr(Axes, "annotate", lambda self, text, *a, **k: notes.append(text) or
                      annotate(self, text, *a, **k))
  log = write_log(tmp_path / "a")
  few = [figure1.load_point(log, label=f"m{i} σ=0.25") for i in range(figure1.LABELLED_POINTS)]
  figure1.draw(few, str(tmp_path / "few.png"), radii=(0.25,))
  assert sorted(notes) == sorted(p.label for p in few)   # each point named beside it
  notes.clear()
  many = few + [figure1.load_point(log, label="another σ=0.5")]
  written = figure1.draw(many, str(tmp_path / "many.png"), radii=(0.25,))
  assert notes == [] and all(os.path.getsize(p) > 0 for p in written)


def test_labels_of_nearby_points_do_not_overlap():
  xs, ys = [0.1, 0.1, 0.12, 0.9], [0.8, 0.8, 0.79, 0.8]
  heights = figure1._label_heights(xs, ys)
  assert heights[3] == 0.8   # far to the right: stays
  near = sorted(heights[:3])
  assert min(np.diff(near)) >= 0.044 and max(near) == 0.8


@pytest.mark.parametrize("text, expected", [
    ("rRCM σ=0.25=a/b.tsv@0.0088", ("rRCM σ=0.25", "a/b.tsv", 0.0088e9)),
    ("a/b.tsv", (None, "a/b.tsv", None)),
    ("DDS=gs://x/y.tsv", ("DDS", "gs://x/y.tsv", None)),
])
def test_parse_spec(text, expected):
  label, path, flops = figure1.parse_spec(text)
  assert (label, path) == expected[:2]
  assert flops == pytest.approx(expected[2]) if expected[2] else flops is None


@pytest.mark.parametrize("text", ["x=a.tsv@fast", "x=a.tsv@-1", "=a.tsv", "x="])
def test_malformed_specs_are_one_sentence(text):
  with pytest.raises(ValueError, match="--logs"):
    figure1.parse_spec(text)


def test_log_without_flops_needs_gflop(tmp_path, capsys):
  path = write_log(tmp_path)
  with pytest.raises(ValueError, match="records no inference_flops_per_sample.*@GFLOP"):
    figure1.load_specs([f"x={path}"])
  assert figure1.load_specs([f"x={path}@0.5"])[0].flops_per_sample == pytest.approx(5e8)
  with pytest.raises(SystemExit) as exit_info:
    figure1.main(["--logs", f"x={tmp_path}/missing.tsv@1", "--out", str(tmp_path / "f.png")])
  assert exit_info.value.code == 2
  assert "does not exist" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "f.png")


def test_certify_records_inference_flops_and_old_logs_resume(tmp_path_factory, tmp_path):
  classifier_dir = shared_finetune_workdir(tmp_path_factory)
  config = tiny_certify_config(classifier_dir, num_images=2)
  certify.run(config, str(tmp_path))
  path = str(tmp_path / "certify_sigma0.25.tsv")
  expected = flops.forward_flops(config.model, num_classes=4)
  assert certlog.read_settings(path)["inference_flops_per_sample"] == expected
  point = figure1.load_point(path)
  assert (point.flops_per_sample, point.images, point.n0, point.n) == (expected, 2, 16, 64)
  # A log written before the count was recorded resumes, and keeps its settings as they were.
  for sidecar in (certlog.settings_path(path), certlog.stem(path) + ".json"):
    with open(sidecar) as f:
      record = json.load(f)
    del record["settings"]["inference_flops_per_sample"]
    with open(sidecar, "w") as f:
      json.dump(record, f)
  result = certify.run(tiny_certify_config(classifier_dir, num_images=3), str(tmp_path))
  assert (result["certified"], result["skipped"]) == (1, 2)
  assert "inference_flops_per_sample" not in certlog.read_settings(path)


def test_dds_inference_flops_are_the_denoiser_and_the_classifier(tmp_path_factory):
  """DDS's count over the whole denoise-and-classify function is the U-Net's forward plus the
  classifier's analytic forward (no resize at the data's size)."""
  model, params, info = classifier.load_classifier(
      shared_finetune_workdir(tmp_path_factory), "last", parallel.make_mesh(jax.devices()[:1]))
  predict = classifier.level_logits_fn(model, info["num_scales"], info["denoiser"])
  unet = diffusion_train.build_unet(diffusion_config().unet)
  logits_fn = dds.make_logits_fn(unet, lambda p, x: predict(p, x, 0.0),
                                 dds.dds_step(0.25, "cosine", 1000, False))
  image = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
  unet_params = jax.eval_shape(unet.init, jax.random.key(0), image, jnp.zeros((1,)))
  config = tiny_certify_config(None, method="dds")
  counted = certify.inference_flops(config, logits_fn,
                                    dict(denoiser=unet_params, classifier=params))
  expected = (diffusion_train.unet_forward_flops(unet, 8) +
              flops.forward_flops(info["model"], num_classes=4))
  assert counted == expected > flops.forward_flops(info["model"], num_classes=4)


@pytest.mark.slow
def test_cli_prints_table_and_writes_figure(tmp_path):
  path = write_log(tmp_path, flops=8.8e6)
  out = tmp_path / "out" / "figure1.png"
  result = subprocess.run([sys.executable, "-m", "experiments.figure1", "--logs",
                           f"rRCM σ=0.25={path}", "--out", str(out), "--table",
                           str(tmp_path / "t.md")], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert "| rRCM σ=0.25 | 0.25 | 5 |" in result.stdout
  assert out.stat().st_size > 0 and (tmp_path / "out" / "figure1.pdf").exists()
  assert (tmp_path / "t.md").read_text().strip() == result.stdout.strip()
