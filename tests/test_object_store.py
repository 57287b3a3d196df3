"""Certification logs, their counts and reports on an object store (a fake gs:// through
etils.epath that refuses appends, where a builtin open() of a gs:// path fails the test),
counts kept in step with the log across a kill, and reports recomputed from the counts."""
import builtins
import json
import math

import numpy as np
import pytest
from etils import epath

from conftest import reference_file
from fake_gcs import fake_gcs
from rrcm_jax import certify, certlog, report
from test_certify import rows, shared_finetune_workdir, tiny_certify_config

COHEN_CIFAR = reference_file("cohen2019/cifar10_resnet110_noise_0.25_sigma_0.25.tsv")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
  return shared_finetune_workdir(tmp_path_factory)


@pytest.fixture
def gcs(monkeypatch):
  """The fake gs:// store; a builtin open() of a gs:// path raises."""
  real_open = builtins.open

  def guarded_open(file, *args, **kwargs):
    if "gs:" in str(file) or str(file).startswith("/bucket"):
      raise AssertionError(f"builtin open() of {file}: object-store paths must go through epath")
    return real_open(file, *args, **kwargs)

  with fake_gcs(monkeypatch) as fs:
    monkeypatch.setattr(builtins, "open", guarded_open)
    yield fs


def _text(path):
  return epath.Path(path).read_text()


def test_certification_and_report_on_an_object_store(classifier_dir, tmp_path, gcs):
  workdir = "gs://bucket/run/certify"
  first = certify.run(tiny_certify_config(classifier_dir, num_images=3), workdir)
  assert first["certified"] == 3
  resumed = certify.run(tiny_certify_config(classifier_dir, num_images=5), workdir)
  assert (resumed["certified"], resumed["skipped"]) == (2, 3)
  local = certify.run(tiny_certify_config(classifier_dir, num_images=5), str(tmp_path))
  log = f"{workdir}/certify_sigma0.25.tsv"
  ours = [line.rsplit("\t", 1)[0] for line in _text(log).splitlines()]
  assert ours == rows(local["log"])
  counts = [json.loads(line) for line in _text(certlog.counts_path(log)).splitlines()]
  assert [c["idx"] for c in counts] == [0, 1, 2, 3, 4]
  assert all(sum(c["n0_counts"]) == 16 and sum(c["counts"]) == 64 for c in counts)
  assert epath.Path(f"{workdir}/certify_sigma0.25.md").exists()
  assert "code_version" in _text(f"{workdir}/runs.jsonl")
  out = "gs://bucket/report/table"
  report.main([log, "--csv", out + ".csv", "--latex", out + ".tex", "--plot", out + ".png",
               "--alpha", "0.01", "--rho", "0.001"])
  assert _text(out + ".csv").startswith("log,images,r=0")
  assert "\\begin{tabular}" in _text(out + ".tex")
  assert epath.Path(out + ".png").read_bytes()[:4] == b"\x89PNG"
  assert epath.Path(out + ".pdf").read_bytes()[:4] == b"%PDF"


def test_log_writer_rewrites_objects_instead_of_appending(gcs):
  path = "gs://bucket/logs/certify_sigma0.5.tsv"
  with certlog.LogWriter(path) as writer:
    writer.write(0, 3, 3, True, 1.0, radius=0.25, counts=([0, 0, 0, 9, 1], [0, 1, 0, 90, 9]))
    writer.write(20, 7, -1, False, 1.0, radius=0.0, counts=([5, 5, 0, 0, 0], [40, 40, 0, 0, 20]))
  with certlog.LogWriter(path) as writer:   # resumes: nothing appended, everything rewritten
    assert writer.done == {0, 20}
    writer.write(40, 4, 4, True, 1.0, radius=0.5, counts=([0, 0, 0, 0, 10], [0, 0, 0, 0, 100]))
  log = certlog.read_log(path)
  assert log["idx"].tolist() == [0, 20, 40] and log["predict"].tolist() == [3, -1, 4]
  assert sorted(certlog.read_counts(path)) == [0, 20, 40]
  assert report.reference_warning("ours", log, certlog.read_log(COHEN_CIFAR), "cohen") is None


class _Killed(Exception):
  pass


@pytest.mark.parametrize("root", ["local", "gs"])
def test_kill_between_counts_and_row_recertifies_the_image(classifier_dir, tmp_path, monkeypatch,
                                                           gcs, root):
  workdir = str(tmp_path / "certify") if root == "local" else "gs://bucket/kill/certify"
  real = certlog.LogWriter.write
  calls = []

  def dies_on_the_second_row(self, *args, counts=None, **kwargs):
    calls.append(args[0])
    if len(calls) == 2:   # the counts reach the file, the row never does
      self._counts.append(json.dumps(dict(idx=int(args[0]), n0_counts=[int(c) for c in counts[0]],
                                          counts=[int(c) for c in counts[1]])) + "\n")
      raise _Killed()
    return real(self, *args, counts=counts, **kwargs)

  monkeypatch.setattr(certlog.LogWriter, "write", dies_on_the_second_row)
  with pytest.raises(_Killed):
    certify.run(tiny_certify_config(classifier_dir, num_images=3), workdir)
  path = f"{workdir}/certify_sigma0.25.tsv"
  assert certlog.read_log(path)["idx"].tolist() == [0]
  assert [json.loads(l)["idx"] for l in _text(certlog.counts_path(path)).splitlines()] == [0, 1]
  monkeypatch.setattr(certlog.LogWriter, "write", real)
  result = certify.run(tiny_certify_config(classifier_dir, num_images=3), workdir)
  assert (result["certified"], result["skipped"]) == (2, 1)   # image 1 is certified again
  indices = [json.loads(l)["idx"] for l in _text(certlog.counts_path(path)).splitlines()]
  assert indices == [0, 1, 2] == certlog.read_log(path)["idx"].tolist()


def test_recomputed_rows_match_the_log_and_loosen_with_alpha(classifier_dir, tmp_path):
  result = certify.run(tiny_certify_config(classifier_dir, num_images=6), str(tmp_path))
  log, counts = certlog.read_log(result["log"]), certlog.read_counts(result["log"])
  same = report.recompute(log, counts, 0.25, 0.001)
  np.testing.assert_array_equal(same["predict"], log["predict"])
  np.testing.assert_allclose(same["radius"], log["radius"], rtol=1e-12)
  loose = report.recompute(log, counts, 0.25, 0.2)
  assert np.all(loose["radius"] >= same["radius"]) and np.any(loose["radius"] > same["radius"])
  settings = report.log_settings(result["log"])
  assert settings["sigma"] == 0.25 and settings["alpha"] == 0.001
  with pytest.raises(ValueError, match="have no class counts"):
    report.recompute(log, {}, 0.25, 0.01)


def test_high_probability_accuracy_is_cohens_bound():
  m, alpha, rho = 500, 0.001, 0.01
  expected = 0.6 - alpha - math.sqrt(alpha * (1 - alpha) * math.log(1 / rho) / m) - (
      math.log(1 / rho) / (3 * m))
  assert report.high_probability_accuracy(0.6, m, alpha, rho) == pytest.approx(expected)
  assert report.high_probability_accuracy(0.6, 10 * m, alpha, rho) > expected


def test_reference_labels_and_latex(capsys):
  cohen = certlog.read_log(COHEN_CIFAR)
  assert dict(zip(cohen["idx"][:3].tolist(), cohen["label"][:3].tolist())) == {0: 3, 20: 7, 40: 4}
  shuffled = dict(cohen, label=np.roll(cohen["label"], 1))
  warning = report.reference_warning("ours", shuffled, cohen, "cohen.tsv")
  assert warning.startswith("warning: ours:") and "\n" not in warning
  report.main([COHEN_CIFAR, COHEN_CIFAR, "--labels", "a_1,b", "--reference", COHEN_CIFAR,
               "--radii", "0,0.5"])
  captured = capsys.readouterr()
  assert "warning" not in captured.err
  report.main([COHEN_CIFAR, "--radii", "0", "--rho", "0.01", "--log-alpha", "0.001"])
  accuracy = float(np.mean(cohen["correct"]))
  bound = report.high_probability_accuracy(accuracy, len(cohen["idx"]), 0.001, 0.01)
  assert f"| 0.001 | {bound:.3f} |" in capsys.readouterr().out
  tex = report.latex_table(["a_1", "b"], [cohen, shuffled], (0.0, 0.5))
  assert "a\\_1" in tex and "\\textbf{" in tex and tex.count("\\\\") == 4


@pytest.mark.parametrize("root", ["local", "gs"])
def test_merge_joins_the_parts_and_their_counts(tmp_path, gcs, root):
  folder = str(tmp_path) if root == "local" else "gs://bucket/merge"
  path = f"{folder}/certify_sigma0.5.tsv"
  for k, indices in ((0, [0, 2]), (1, [1])):
    with certlog.LogWriter(certlog.process_log_path(path, k, 2)) as writer:
      for i in indices:
        writer.write(i, 1, 1, True, 0.1, radius=0.3, counts=([0, 5], [1, 50 + i]))
  assert sorted(certlog.read_counts(path)) == [0, 1, 2]   # read through the parts
  assert certlog.merge_logs(path) == 3
  lines = _text(certlog.counts_path(path)).splitlines()
  assert [json.loads(line)["idx"] for line in lines] == [0, 1, 2]
  assert json.loads(lines[1])["counts"] == [1, 51]
  assert certlog.read_log(path)["idx"].tolist() == [0, 1, 2]


def test_predict_logs_recompute_from_their_counts(tmp_path):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "predict_sigma0.25.tsv")
  with certlog.LogWriter(path, mode="predict") as writer:
    writer.write(0, 0, -1, False, 0.1, counts=(None, [60, 40, 0]))
    writer.write(1, 2, 2, True, 0.1, counts=(None, [0, 1, 99]))
  assert json.loads(_text(certlog.counts_path(path)).splitlines()[0])["n0_counts"] is None
  log = certlog.read_log(path)
  p_value = stats.binomtest(60, 100, 0.5).pvalue
  for alpha in (p_value / 2, 2 * p_value):
    again = report.recompute(log, certlog.read_counts(path), None, alpha)
    assert again["predict"].tolist() == [0 if alpha > p_value else -1, 2]
    assert again["correct"].tolist() == [alpha > p_value, True]
