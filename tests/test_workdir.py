"""Run records and progress lines (rrcm_jax.workdir)."""
import pytest

from rrcm_jax import workdir


@pytest.mark.parametrize("seconds, text", [
    (0, "00:00:00"), (59.6, "00:01:00"), (3600, "01:00:00"), (86399, "23:59:59"),
    (86400, "1d 00:00:00"), (49 * 3600, "2d 01:00:00"), (float("inf"), "--:--:--"),
    (float("nan"), "--:--:--")])
def test_format_duration_counts_days(seconds, text):
  assert workdir.format_duration(seconds) == text


def test_progress_eta_beyond_a_day(capsys, monkeypatch):
  times = iter([0.0, 3600.0])   # one step per hour, 49 steps left -> 49 h
  monkeypatch.setattr(workdir.time, "time", lambda: next(times))
  progress = workdir.Progress(total=50, start=0)
  progress.update(1)
  assert "ETA 2d 01:00:00" in capsys.readouterr().out
