"""Run records and progress lines (rrcm_jax.workdir)."""
import json
import sys

import pytest

from rrcm_jax import workdir


@pytest.mark.parametrize("seconds, text", [
    (0, "00:00:00"), (59.6, "00:01:00"), (3600, "01:00:00"), (86399, "23:59:59"),
    (86400, "1d 00:00:00"), (49 * 3600, "2d 01:00:00"), (float("inf"), "--:--:--"),
    (float("nan"), "--:--:--")])
def test_format_duration_counts_days(seconds, text):
  assert workdir.format_duration(seconds) == text


def test_progress_eta_beyond_a_day_and_without_the_compiling_step(capsys, monkeypatch):
  times = iter([5000.0, 8600.0])   # the first update follows compiling; then an hour a step
  monkeypatch.setattr(workdir.time, "time", lambda: next(times))
  progress = workdir.Progress(total=51, start=0)
  progress.update(1)
  assert "ETA --:--:--" in capsys.readouterr().out
  progress.update(2)   # 49 steps left at one step per hour
  assert "ETA 2d 01:00:00" in capsys.readouterr().out


def test_metrics_writer_json_lines_and_hparams(tmp_path):
  with workdir.MetricsWriter(tmp_path) as writer:
    writer.write_hparams(workdir.flat_hparams({"optim": {"lr": 1e-3}, "seed": 0, "x": (1, 2)}))
    for step in (10, 20):
      writer.write(step, {"loss": step / 10})
  assert workdir.read_metrics(tmp_path) == [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 2.0}]
  hparams = json.loads((tmp_path / "hparams.json").read_text())
  assert hparams == {"optim.lr": 1e-3, "seed": 0, "x": "(1, 2)"}


def test_metrics_writer_without_clu(tmp_path, monkeypatch):
  for name in [m for m in sys.modules if m == "clu" or m.startswith("clu.")] + ["clu"]:
    monkeypatch.setitem(sys.modules, name, None)   # a machine without CLU (or TensorFlow)
  writer = workdir.MetricsWriter(tmp_path)
  writer.write(1, {"loss": 0.5})
  writer.close()
  assert workdir.read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]
  assert not (tmp_path / "tensorboard").exists()


def test_record_run_writes_config_runs_and_hparams(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"seed": 3, "optim": {"lr": 0.5}})
  with workdir.MetricsWriter(tmp_path) as writer:
    workdir.record_run(tmp_path, config, argv=["x"], writer=writer)
  assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 3, "optim": {"lr": 0.5}}
  (run,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
  assert run["seed"] == 3 and run["argv"] == ["x"] and run["code_version"]
  assert json.loads((tmp_path / "hparams.json").read_text()) == {"seed": 3, "optim.lr": 0.5}
