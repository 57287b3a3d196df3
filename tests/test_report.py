"""Tests of certified-accuracy reports (rrcm_jax/report.py) against Cohen et al.'s own logs."""
import csv
import pathlib
import re

import numpy as np
import pytest

from conftest import reference_file
from rrcm_jax import certlog, report

COHEN = pathlib.Path(reference_file("cohen2019"))
CIFAR_LOGS = {s: COHEN / f"cifar10_resnet110_noise_{s:.2f}_sigma_{s:.2f}.tsv" for s in (0.25, 0.5, 1.0)}
IMAGENET_LOGS = {0.5: COHEN / "imagenet_resnet50_noise_0.50_sigma_0.50.tsv"}


def published_table(name):
  """(radii, {sigma: (cells as printed, starred?)}) of one of Cohen et al.'s Markdown tables."""
  lines = (COHEN / name).read_text().splitlines()
  radii = [float(cell.split("=")[1]) for cell in lines[0].split("|") if "r =" in cell]
  rows = {}
  for line in lines[2:]:
    label, *cells = line.split("|")
    cells = [cell.strip() for cell in cells if cell.strip()]
    sigma = float(re.search(r"= ([\d.]+)", label).group(1))
    rows[sigma] = ([cell.replace("<b>*</b>", "") for cell in cells], ["*" in cell for cell in cells])
  return radii, rows


@pytest.mark.parametrize("table, logs", [
    ("vary_noise_cifar10.md", CIFAR_LOGS), ("vary_noise_imagenet.md", IMAGENET_LOGS)])
def test_reproduces_published_rows(table, logs):
  radii, rows = published_table(table)
  for sigma, path in logs.items():
    log = certlog.read_log(str(path))
    accuracies, _ = report.summarize([log], radii)
    assert [f"{a:.2f}" for a in accuracies[0]] == rows[sigma][0], sigma


def test_envelope_marks_the_published_best_sigma():
  radii, rows = published_table("vary_noise_cifar10.md")
  sigmas = sorted(CIFAR_LOGS)
  logs = [certlog.read_log(str(CIFAR_LOGS[s])) for s in sigmas]
  accuracies, _ = report.summarize(logs, radii)
  # The sigma = 0.12 row (no log) never beats the covered rows, so the stars are comparable.
  assert all(float(v) <= f for v, f in zip(rows[0.12][0], accuracies.max(0)))
  np.testing.assert_array_equal(report.best_mask(accuracies), [rows[s][1] for s in sigmas])
  table = report.markdown_table([f"sigma={s}" for s in sigmas], logs, radii).splitlines()
  assert table[0] == "| log | images | " + " | ".join(f"r = {r:g}" for r in radii) + " | ACR |"
  assert table[2].startswith("| sigma=0.25 | 500 | **0.600** | **0.428** | 0.266 |")
  assert table[-1] == "| best |  | 0.600 | 0.428 | 0.320 | 0.234 | 0.174 | 0.140 | 0.542 |"


def test_certified_accuracy_and_acr_by_hand():
  radius, correct = np.array([0.5, 1.0, 0.0, 0.3]), np.array([True, False, True, True])
  np.testing.assert_allclose(report.certified_accuracy(radius, correct, [0, 0.3, 0.31, 0.5, 0.6]),
                             [0.75, 0.5, 0.25, 0.25, 0.0])
  assert report.certified_accuracy(radius, correct, 0.3) == 0.5
  assert report.acr(radius, correct) == pytest.approx((0.5 + 0.3) / 4)
  assert not report.best_mask(np.array([[0.5, 0.2]])).any()  # one log: nothing to mark


def test_cli_table_csv_and_plot(tmp_path, capsys):
  paths = [str(CIFAR_LOGS[s]) for s in sorted(CIFAR_LOGS)]
  out_csv, out_plot = tmp_path / "table.csv", tmp_path / "curves.png"
  report.main(paths + ["--radii", "0,0.5,1", "--labels", "a,b,c", "--csv", str(out_csv),
                       "--plot", str(out_plot)])
  printed = capsys.readouterr().out.splitlines()
  assert printed[0] == "| log | images | r = 0 | r = 0.5 | r = 1 | ACR |"
  assert [line.split(" | ")[0] for line in printed[2:]] == ["| a", "| b", "| c", "| best"]
  with open(out_csv) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["log", "images", "r=0", "r=0.5", "r=1", "acr"]
  assert rows[-1][0] == "best" and float(rows[-1][2]) == pytest.approx(0.748)
  assert out_plot.read_bytes().startswith(b"\x89PNG")
  assert (tmp_path / "curves.pdf").read_bytes().startswith(b"%PDF")
  assert (tmp_path / "curves.pdf").stat().st_size > 1000


def test_predict_logs_count_as_radius_zero(tmp_path):
  path = str(tmp_path / "predict.log")
  with certlog.LogWriter(path, mode="predict") as writer:
    writer.write(0, label=1, predict=1, correct=True, seconds=1.0)
    writer.write(1, label=1, predict=-1, correct=False, seconds=1.0)
  accuracies, acrs = report.summarize([certlog.read_log(path)], [0.0, 0.25])
  np.testing.assert_allclose(accuracies, [[0.5, 0.0]])
  assert acrs[0] == 0.0


@pytest.mark.parametrize("argv, message", [
    (["--radii", "0,-1"], "--radii must be a comma-separated list of numbers >= 0"),
    (["--labels", "a,b"], "--labels must give one label per log"),
])
def test_cli_bad_arguments(argv, message, capsys):
  with pytest.raises(SystemExit):
    report.main([str(IMAGENET_LOGS[0.5])] + argv)
  assert message in capsys.readouterr().err


def test_cli_refuses_a_non_cohen_file(tmp_path, capsys):
  path = tmp_path / "notes.txt"
  path.write_text("hello\n")
  with pytest.raises(SystemExit):
    report.main([str(path)])
  assert "is not a Cohen-format certification log" in capsys.readouterr().err
