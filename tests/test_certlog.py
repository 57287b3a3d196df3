"""Tests of Cohen-format certification logs (rrcm_jax/certlog.py)."""
import pathlib

import numpy as np
import pytest

from conftest import reference_file
from rrcm_jax import certlog

COHEN = pathlib.Path(reference_file("cohen2019"))


def test_write_flushes_each_line_and_reads_back(tmp_path):
  path = str(tmp_path / "certify.log")
  writer = certlog.LogWriter(path)
  writer.write(0, label=3, predict=3, correct=True, seconds=1.25, radius=0.123456789012)
  lines = pathlib.Path(path).read_text().splitlines()  # visible before close
  assert lines == ["idx\tlabel\tpredict\tradius\tcorrect\ttime", "0\t3\t3\t0.123456789012\t1\t1.250"]
  writer.write(20, label=7, predict=-1, correct=False, seconds=2.0, radius=0.0)
  writer.close()
  log = certlog.read_log(path)
  assert log["mode"] == "certify"
  np.testing.assert_array_equal(log["idx"], [0, 20])
  np.testing.assert_array_equal(log["predict"], [3, -1])
  np.testing.assert_array_equal(log["correct"], [True, False])
  assert log["radius"][0] == 0.123456789012  # exact, no rounding of the certificate
  np.testing.assert_allclose(log["time"], [1.25, 2.0])


def test_predict_mode(tmp_path):
  path = str(tmp_path / "predict.log")
  with certlog.LogWriter(path, mode="predict") as writer:
    writer.write(5, label=1, predict=1, correct=True, seconds=0.5)
    with pytest.raises(ValueError, match="radius must be given in certify mode and only there"):
      writer.write(6, label=1, predict=1, correct=True, seconds=0.5, radius=0.3)
  assert pathlib.Path(path).read_text().splitlines()[0] == "idx\tlabel\tpredict\tcorrect\ttime"
  log = certlog.read_log(path)
  assert log["mode"] == "predict" and "radius" not in log and list(log["idx"]) == [5]


def test_resume_skips_done_and_never_truncates(tmp_path):
  path = str(tmp_path / "certify.log")
  with certlog.LogWriter(path) as writer:
    for idx in (0, 20, 40):
      writer.write(idx, label=1, predict=1, correct=True, seconds=1.0, radius=0.5)
  before = pathlib.Path(path).read_text()
  with certlog.LogWriter(path) as writer:
    assert writer.done == {0, 20, 40}
    with pytest.raises(ValueError, match="image 20 is already in"):
      writer.write(20, label=1, predict=1, correct=True, seconds=1.0, radius=0.5)
    writer.write(60, label=2, predict=-1, correct=False, seconds=1.0, radius=0.0)
  after = pathlib.Path(path).read_text()
  assert after.startswith(before) and after.count("idx\t") == 1
  assert list(certlog.read_log(path)["idx"]) == [0, 20, 40, 60]


def test_a_last_line_without_newline_is_torn_and_certified_again(tmp_path):
  path = tmp_path / "certify.log"
  path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t1.0")
  assert len(certlog.read_log(str(path))["idx"]) == 0   # readers skip the cut-short row
  with certlog.LogWriter(str(path)) as writer:
    assert writer.done == set()
    writer.write(0, label=1, predict=1, correct=True, seconds=1.0, radius=0.5)
  assert list(certlog.read_log(str(path))["idx"]) == [0]
  assert (tmp_path / "certify.log.torn").read_text() == "0\t1\t1\t0.5\t1\t1.0\n"
  path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n1\t1\t1\n0\t1\t1\t0.5\t1\t1.0\n")
  with pytest.raises(ValueError, match="line 2: .* is not a complete certify row"):
    certlog.LogWriter(str(path))


@pytest.mark.parametrize("content, message", [
    ("epoch\tloss\n1\t0.5\n", "is not a Cohen-format certification log"),
    ("", None),
    ("idx\tlabel\tpredict\tcorrect\ttime\n3\t1\t1\t1\t0.1\n", "is a predict-mode log, but mode is 'certify'"),
])
def test_refuses_other_files_without_modifying_them(tmp_path, content, message):
  path = tmp_path / "certify.log"
  path.write_text(content)
  if message is None:  # an empty file is a new log
    certlog.LogWriter(str(path)).close()
    assert path.read_text() == "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    return
  with pytest.raises(ValueError, match=message):
    certlog.LogWriter(str(path))
  assert path.read_text() == content


def test_bad_mode(tmp_path):
  with pytest.raises(ValueError, match=r"mode must be one of \['certify', 'predict'\]"):
    certlog.LogWriter(str(tmp_path / "x.log"), mode="smooth")


def test_merge_process_parts(tmp_path):
  path = str(tmp_path / "certify.log")
  assert certlog.process_log_path(path) == path
  assert certlog.process_log_path(path, 1, 2) == path + ".p1"
  for k in range(2):
    with certlog.LogWriter(certlog.process_log_path(path, k, 2)) as writer:
      for idx in range(k, 10, 2):
        writer.write(idx, label=idx, predict=idx, correct=True, seconds=1.0, radius=idx / 10)
  with open(path + ".p10", "w") as f:  # a third part, ordered numerically after .p1
    f.write(certlog.header("certify") + "\n10\t0\t0\t0.0\t0\t1.0\n")
  assert certlog.part_paths(path) == [path + ".p0", path + ".p1", path + ".p10"]
  assert certlog.merge_logs(path) == 11
  log = certlog.read_log(path)
  np.testing.assert_array_equal(log["idx"], np.arange(11))
  np.testing.assert_allclose(log["radius"][:10], np.arange(10) / 10)
  assert certlog.merge_logs(path) == 11  # idempotent: rows already in the log are kept
  with open(path + ".p1", "a") as f:
    f.write("4\t4\t-1\t0.0\t0\t1.0\n")  # conflicts with process 0's row for image 4
  before = pathlib.Path(path).read_text()
  with pytest.raises(ValueError, match="image 4 has different results"):
    certlog.merge_logs(path)
  assert pathlib.Path(path).read_text() == before


def test_merge_refuses_mixed_modes(tmp_path):
  path = str(tmp_path / "log")
  certlog.LogWriter(path + ".p0", mode="certify").close()
  certlog.LogWriter(path + ".p1", mode="predict").close()
  with pytest.raises(ValueError, match="cannot merge logs of different modes"):
    certlog.merge_logs(path)
  with pytest.raises(ValueError, match="no log to merge"):
    certlog.merge_logs(str(tmp_path / "missing"))


def test_reads_both_time_formats():
  assert certlog.parse_time("15.4") == 15.4
  assert certlog.parse_time("0:02:32.717239") == pytest.approx(152.717239)
  assert certlog.parse_time("1 day, 0:00:01.5") == pytest.approx(86401.5)
  seconds = certlog.read_log(str(COHEN / "cifar10_resnet110_noise_0.25_sigma_0.25.tsv"))
  hms = certlog.read_log(str(COHEN / "imagenet_resnet50_noise_0.50_sigma_0.50.tsv"))
  assert len(seconds["idx"]) == len(hms["idx"]) == 500
  assert seconds["time"][:2].tolist() == [15.4, 15.6]
  np.testing.assert_allclose(hms["time"][:2], [152.717239, 150.318316])
  assert hms["predict"][0] == 394 and hms["radius"][0] == 0.0125 and not hms["correct"][0]
