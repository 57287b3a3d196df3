"""Reliability: damaged checkpoints are detected and skipped, a kill during a save loses
nothing committed, one run per workdir, certification logs heal after a kill."""
import errno
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrcm_jax import certlog, checkpoints, report
from rrcm_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------
def _state(step):
  """A small TrainState-like tree whose values depend on `step`."""
  return {"params": {"w": jnp.arange(3000, dtype=jnp.float32) + step},
          "opt": {"mu": jnp.full((40, 50), float(step)), "count": jnp.asarray(step, jnp.int32)}}


def _save_steps(workdir, steps=(1, 2)):
  ckpt = checkpoints.Checkpointer(workdir, latest_every=1, keep=3)
  for step in steps:
    ckpt.save(step, _state(step), meta=dict(total_steps=10))
  ckpt.close()


def _restore(workdir):
  ckpt = checkpoints.Checkpointer(workdir, latest_every=1, keep=3)
  try:
    restored = ckpt.restore(checkpoints.abstract_like(_state(0)))
  finally:
    ckpt.close()
  return restored, ckpt


def _largest_array_file(step_dir):
  files = [p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)
  return path.name


def _overwrite_middle(step_dir):
  path = _largest_array_file(step_dir)
  size = path.stat().st_size
  with open(path, "r+b") as f:
    f.seek(max(size // 2 - 2048, 0))
    f.write(os.urandom(min(4096, size)))
  assert path.stat().st_size == size
  return path.name


def _garbage_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_text("{not json at all")
  return "_METADATA"


def _delete_state(step_dir):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(step_dir / "state")
  return "state/"


@pytest.mark.parametrize("damage", [_truncate, _overwrite_middle, _garbage_metadata,
                                    _delete_state])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, damage, capsys):
  _save_steps(tmp_path)
  named = damage(tmp_path / "checkpoints" / "2")
  (state, meta), ckpt = _restore(tmp_path)
  assert meta["step"] == 1
  np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
  assert len(ckpt.notices) == 1
  notice = ckpt.notices[0]
  assert "step 2" in notice and named.rstrip("/") in notice and "restoring step 1" in notice
  assert "newest verified checkpoint" in notice and notice.count(". ") == 0
  assert notice in capsys.readouterr().err
  # moved aside, so the resumed run can save step 2 again
  assert (tmp_path / "checkpoints" / "2.corrupt").is_dir()
  assert ckpt.all_steps() == [1]


def test_readers_verify_without_moving_anything(tmp_path):
  _save_steps(tmp_path)
  _overwrite_middle(tmp_path / "checkpoints" / "2")
  ckpt = checkpoints.Checkpointer(tmp_path)
  assert ckpt.verified_step() == 1 and ckpt.verified_step(1) == 1
  with pytest.raises(checkpoints.CheckpointDamaged, match="step 2 .* failed verification"):
    ckpt.verified_step(2)
  assert ckpt.restore_meta()["step"] == 1
  ckpt.close()
  assert (tmp_path / "checkpoints" / "2").is_dir()


def test_no_intact_checkpoint_is_one_sentence_and_stops(tmp_path):
  _save_steps(tmp_path)
  _overwrite_middle(tmp_path / "checkpoints" / "1")
  _truncate(tmp_path / "checkpoints" / "2")
  with pytest.raises(checkpoints.CheckpointDamaged, match=r"no checkpoint in .* is intact "
                     r"\(step 2: .*; step 1: .*\)") as error:
    _restore(tmp_path)
  assert "\n" not in str(error.value)
  # distinct statuses: bad input 2, damaged checkpoints, busy workdir, preempted (75)
  assert len({2, 75, error.value.exit_code, workdir_lib.WorkdirBusy.exit_code}) == 4


def test_every_saved_checkpoint_carries_a_manifest_and_resaves_after_fallback(tmp_path):
  _save_steps(tmp_path, (1, 2, 3))
  for step in (1, 2, 3):
    assert checkpoints.verify_manifest(tmp_path / "checkpoints" / str(step)) is None
  _garbage_metadata(tmp_path / "checkpoints" / "3")
  ckpt = checkpoints.Checkpointer(tmp_path, latest_every=1, keep=3)
  (state, meta) = ckpt.restore(checkpoints.abstract_like(_state(0)))
  assert meta["step"] == 2
  assert ckpt.save(3, _state(3))   # step 3 was moved aside: it can be written again
  ckpt.close()
  (state, meta), _ = _restore(tmp_path)
  assert meta["step"] == 3 and int(state["opt"]["count"]) == 3


def test_readers_of_another_runs_checkpoints_never_read_a_damaged_step(tmp_path):
  _save_steps(tmp_path)
  _overwrite_middle(tmp_path / "checkpoints" / "2")
  ckpt = checkpoints.Checkpointer(tmp_path)
  try:
    assert checkpoints.complete_step(ckpt, None, "config.init_from") == 1   # the newest intact
    with pytest.raises(checkpoints.CheckpointDamaged, match="step 2 .* failed verification"):
      checkpoints.complete_step(ckpt, 2, "config.init_from")
    with pytest.raises(ValueError, match="config.init_from has no complete checkpoint at step 5"):
      checkpoints.complete_step(ckpt, 5, "config.init_from")
  finally:
    ckpt.close()
  assert (tmp_path / "checkpoints" / "2").is_dir()   # another run's: nothing moved


def test_a_checkpoint_without_manifest_is_restored_with_a_notice(tmp_path):
  _save_steps(tmp_path)
  (tmp_path / "checkpoints" / "2" / checkpoints.MANIFEST).unlink()
  (_, meta), ckpt = _restore(tmp_path)
  assert meta["step"] == 2 and "restored unverified" in ckpt.notices[0]


_KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from rrcm_jax import checkpoints
    ckpt = checkpoints.Checkpointer(sys.argv[1], latest_every=1, keep=3)
    ckpt.save(1, {"w": jnp.full((1000,), 1.0)})
    ckpt.wait()
    ckpt.save(2, {"w": jnp.full((1000,), 2.0), "big": jnp.ones((4096, 4096))})
    os.kill(os.getpid(), signal.SIGKILL)   # while the save thread writes step 2
""")


@pytest.mark.slow
def test_kill_during_save_restores_the_newest_intact_checkpoint(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(tmp_path)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]
  ckpt = checkpoints.Checkpointer(tmp_path, latest_every=1, keep=3)
  assert ckpt.all_steps() == [1]   # step 2 never committed
  state, meta = ckpt.restore({"w": jax.ShapeDtypeStruct((1000,), jnp.float32)})
  ckpt.close()
  assert meta["step"] == 1 and float(state["w"][0]) == 1.0 and not ckpt.notices


def test_divergence_message_names_the_newest_verified_checkpoint(tmp_path):
  ckpt = checkpoints.Checkpointer(tmp_path, latest_every=1)
  ckpt.save(1, _state(1))
  ckpt.wait()
  with pytest.raises(FloatingPointError, match="newest verified checkpoint \\(step 1\\)"):
    checkpoints.check_finite([(2, {"loss": float("nan")})], ckpt)
  ckpt.close()


# ----------------------------------------------------------------------------
# One run per workdir.
# ----------------------------------------------------------------------------
_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from rrcm_jax import workdir
    with workdir.lock(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(120)
""")


@pytest.mark.slow
def test_a_second_process_is_told_who_holds_the_workdir(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    second = subprocess.run([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode != 0 and "locked" not in second.stdout
    last = second.stderr.strip().splitlines()[-1]
    assert "WorkdirBusy" in last and f"pid {holder.pid} on host" in last and "since" in last
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {holder.pid} "):
      with workdir_lib.lock(tmp_path):
        pass
  finally:
    holder.kill()   # SIGKILL: the kernel drops the lock, nothing stale remains
    holder.wait()
  with workdir_lib.lock(tmp_path) as held:
    assert isinstance(held, workdir_lib.FileLock)


class _Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_lease_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, capsys):
  clock = _Clock()
  options = dict(heartbeat_s=10, stale_s=60, settle_s=0, clock=clock)
  first = workdir_lib.Lease(tmp_path, **options)
  first.acquire()
  first._stop.set()   # drive the heartbeat by hand with the fake clock
  clock.now += 50
  assert first.heartbeat()
  clock.now += 50   # 50 s since the last heartbeat: still alive
  second = workdir_lib.Lease(tmp_path, **options)
  with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {os.getpid()} on host"):
    second.acquire()
  clock.now += 11   # 61 s: stale, the holder is presumed dead
  second.acquire()
  assert second.took_over["owner"] == first.token
  assert "took over" in capsys.readouterr().err
  assert not first.heartbeat() and first.lost   # the old holder learns it lost the lease
  first.release()
  assert second.read()["owner"] == second.token   # releasing a lost lease leaves the new one
  second.release()
  assert second.read() is None


def test_lease_race_only_the_last_writer_proceeds(tmp_path, monkeypatch):
  clock = _Clock()
  first = workdir_lib.Lease(tmp_path, settle_s=0, clock=clock)
  rival = dict(owner="rival", host="h", pid=1, since=clock(), heartbeat=clock())
  sleep = time.sleep
  def rival_writes_while_first_settles(seconds):
    first.path.write_text(json.dumps(rival))
    sleep(seconds)
  monkeypatch.setattr(workdir_lib.time, "sleep", rival_writes_while_first_settles)
  with pytest.raises(workdir_lib.WorkdirBusy, match="pid 1 on host h"):
    first.acquire()
  assert first.read()["owner"] == "rival"


# ----------------------------------------------------------------------------
# Certification logs.
# ----------------------------------------------------------------------------
SETTINGS = dict(mode="certify", sigma=0.25, n=100, n0=10, alpha=0.001, seed=0,
                classifier=dict(source="finetune", checkpoint="last", train_flops=1.0))


def _write_rows(path, *rows):
  with certlog.LogWriter(str(path)) as writer:
    for idx, predict, radius, seconds in rows:
      writer.write(idx, label=1, predict=predict, correct=predict == 1, seconds=seconds,
                   radius=radius)


def test_torn_last_row_is_moved_aside_and_its_image_certified_again(tmp_path, capsys):
  path = tmp_path / "certify_sigma0.25.tsv"
  certlog.check_or_write_settings(str(path), SETTINGS)
  _write_rows(path, (0, 1, 0.5, 1.0), (1, 1, 0.75, 1.0))
  with open(path, "a") as f:
    f.write("2\t1\t1\t0.3")   # killed in the middle of image 2's row
  with certlog.LogWriter(str(path)) as writer:
    assert writer.done == {0, 1}
    writer.write(2, label=1, predict=1, correct=True, seconds=2.0, radius=0.375)
  err = capsys.readouterr().err
  assert "row cut short" in err and "certified again" in err and len(err.strip().splitlines()) == 1
  assert (tmp_path / "certify_sigma0.25.tsv.torn").read_text() == "2\t1\t1\t0.3\n"
  log = certlog.read_log(str(path))
  assert list(log["idx"]) == [0, 1, 2] and log["radius"][2] == 0.375
  assert certlog.read_settings(str(path)) == json.loads(json.dumps(SETTINGS))


def test_rows_differing_only_in_time_are_one_result_conflicts_are_refused(tmp_path):
  path = tmp_path / "certify.tsv"
  head = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
  path.write_text(head + "0\t1\t1\t0.5\t1\t1.0\n0\t1\t1\t0.5\t1\t7.5\n3\t2\t-1\t0.0\t0\t2.0\n")
  log = certlog.read_log(str(path))
  assert list(log["idx"]) == [0, 3] and log["time"][0] == 1.0
  path.write_text(head + "0\t1\t1\t0.5\t1\t1.0\n0\t1\t1\t0.625\t1\t1.0\n")
  with pytest.raises(ValueError, match="image 0 appears twice with different results"):
    certlog.read_log(str(path))
  part = tmp_path / "certify.tsv.p0"
  part.write_text(head + "0\t1\t1\t0.5\t1\t9.0\n")
  path.write_text(head + "0\t1\t1\t0.5\t1\t1.0\n")
  assert certlog.merge_logs(str(path)) == 1


def test_settings_file_binds_the_log_which_stays_in_cohen_format(tmp_path):
  path = str(tmp_path / "certify_sigma0.25.tsv")
  certlog.check_or_write_settings(path, SETTINGS, write=False)   # processes other than 0
  assert not os.path.exists(certlog.settings_path(path))
  certlog.check_or_write_settings(path, SETTINGS)
  assert certlog.settings_path(path) == str(tmp_path / "certify_sigma0.25.settings.json")
  _write_rows(path, (0, 1, 0.5, 1.0))
  assert not os.path.exists(path[:-4] + ".json")   # certify's record is lost: still bound
  # Cohen et al.'s reader takes the first line as the header
  assert pathlib.Path(path).read_text().splitlines()[0] == certlog.header("certify")
  certlog.check_or_write_settings(path, dict(SETTINGS, classifier=dict(SETTINGS["classifier"],
                                                                       train_flops=2.0)))
  with pytest.raises(ValueError, match=r"was made with n=100, this run has 1000; restart with"):
    certlog.check_or_write_settings(path, dict(SETTINGS, n=1000))
  assert list(certlog.read_log(path)["idx"]) == [0]
  written = pathlib.Path(certlog.settings_path(path)).read_text()
  certlog.check_or_write_settings(path, SETTINGS)
  assert pathlib.Path(certlog.settings_path(path)).read_text() == written   # never rewritten
  pathlib.Path(path + ".p1").write_text(certlog.header("certify") + "\n1\t1\t1\t0.25\t1\t1.0\n")
  assert certlog.merge_logs(path) == 2 and certlog.read_settings(path)["n"] == 100


def test_pandas_reads_the_log_as_cohen_et_al_do(tmp_path):
  pandas = pytest.importorskip("pandas")
  path = str(tmp_path / "certify_sigma0.25.tsv")
  certlog.check_or_write_settings(path, SETTINGS)
  _write_rows(path, (0, 1, 0.5, 1.0), (3, -1, 0.0, 2.0))
  frame = pandas.read_csv(path, delimiter="\t")   # their analyze.py, as it is
  assert list(frame.columns) == list(certlog.COLUMNS["certify"])
  assert list(frame["idx"]) == [0, 3] and list(frame["radius"]) == [0.5, 0.0]


def test_a_log_without_settings_adopts_its_record_or_refuses(tmp_path):
  path = str(tmp_path / "certify_sigma0.25.tsv")
  _write_rows(path, (0, 1, 0.5, 1.0))   # written before settings were recorded
  with pytest.raises(ValueError, match="no record of the settings"):
    certlog.check_or_write_settings(path, SETTINGS)
  with open(path[:-4] + ".json", "w") as f:
    json.dump(dict(settings=SETTINGS), f)
  with pytest.raises(ValueError, match="was made with sigma=0.25, this run has 0.5"):
    certlog.check_or_write_settings(path, dict(SETTINGS, sigma=0.5))
  certlog.check_or_write_settings(path, SETTINGS)
  os.remove(path[:-4] + ".json")
  assert certlog.read_settings(path)["sigma"] == 0.25
  with pytest.raises(ValueError, match="was made with sigma=0.25, this run has 0.5"):
    certlog.check_or_write_settings(path, dict(SETTINGS, sigma=0.5))
  assert list(certlog.read_log(path)["idx"]) == [0]


def test_a_settings_line_of_an_earlier_version_moves_to_the_settings_file(tmp_path):
  path = tmp_path / "certify_sigma0.25.tsv"
  path.write_text(certlog.SETTINGS_PREFIX + json.dumps(SETTINGS) + "\n" +
                  certlog.header("certify") + "\n0\t1\t1\t0.5\t1\t1.0\n")
  with pytest.raises(ValueError, match="was made with n=100, this run has 7"):
    certlog.check_or_write_settings(str(path), dict(SETTINGS, n=7))
  certlog.check_or_write_settings(str(path), SETTINGS)
  assert path.read_text().splitlines()[0] == certlog.header("certify")
  assert list(certlog.read_log(str(path))["idx"]) == [0]
  with pytest.raises(ValueError, match="was made with n=100, this run has 7"):
    certlog.check_or_write_settings(str(path), dict(SETTINGS, n=7))


def test_report_refuses_non_finite_radii(tmp_path):
  path = tmp_path / "certify.tsv"
  path.write_text(certlog.header("certify") + "\n0\t1\t1\t0.5\t1\t1.0\n4\t1\t1\tnan\t1\t1.0\n")
  log = certlog.read_log(str(path))
  with pytest.raises(ValueError, match=r"^x: image 4 has radius nan, but a certified radius is a "
                     r"finite number; [^.]*\.$"):
    report.markdown_table(["x"], [log])
  with pytest.raises(SystemExit) as stop:
    report.main([str(path)])
  assert stop.value.code == 2


def test_a_workdir_the_lock_created_goes_when_the_run_wrote_nothing(tmp_path):
  with pytest.raises(ValueError, match="bad input"):
    with workdir_lib.lock(tmp_path / "new"):
      raise ValueError("bad input")
  assert not (tmp_path / "new").exists()
  with workdir_lib.lock(tmp_path / "used"):
    (tmp_path / "used" / "config.json").write_text("{}")
  assert (tmp_path / "used" / "config.json").exists()
  (tmp_path / "old").mkdir()
  with workdir_lib.lock(tmp_path / "old"):
    pass
  assert (tmp_path / "old").is_dir()   # it was there before: kept


def test_lock_on_an_unwritable_workdir_is_one_sentence(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="is not writable"):
    with workdir_lib.lock(blocker / "workdir"):
      pass


# ----------------------------------------------------------------------------
# A full disk: one sentence, nothing already written is lost.
# ----------------------------------------------------------------------------
@pytest.fixture()
def full_disk(tmp_path, monkeypatch):
  """(directory, fill, free): a directory on a 256 KiB tmpfs when this runs as root (fill()
  leaves about 4 KiB, free() gives the space back); elsewhere a stub in which, after fill()
  and three more, every fsync raises OSError(ENOSPC) until free()."""
  directory = tmp_path / "disk"
  directory.mkdir()
  mounted = os.geteuid() == 0 and subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(directory)],
      capture_output=True).returncode == 0
  filler = directory / "filler"
  full = []

  def fill():
    if not mounted:
      full.append(3)
      return
    with open(filler, "wb", buffering=0) as f:
      try:
        while True:
          f.write(b"\0" * 1024)
      except OSError as e:
        assert e.errno == errno.ENOSPC
    os.truncate(filler, max(filler.stat().st_size - 4096, 0))

  def free():
    full.clear()
    if filler.exists():
      filler.unlink()

  if not mounted:
    fsync = os.fsync
    def fsync_or_full(fd):
      if full and full[0] == 0:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      if full:
        full[0] -= 1
      fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync_or_full)
  yield directory, fill, free
  if mounted:
    subprocess.run(["umount", "-l", str(directory)], check=False)   # -l: even if a file is open


def test_certification_on_a_full_disk_is_one_sentence_and_keeps_every_row(full_disk):
  from rrcm_jax import cli  # pylint: disable=g-import-not-at-top
  directory, fill, free = full_disk
  path = str(directory / "certify_sigma0.25.tsv")
  certlog.check_or_write_settings(path, SETTINGS)
  written = []
  with certlog.LogWriter(path) as writer:
    fill()
    with pytest.raises(OSError) as error:
      for idx in range(100_000):
        writer.write(idx, label=1, predict=1, correct=True, seconds=1.5, radius=0.25 + idx)
        written.append(idx)
  assert error.value.errno == errno.ENOSPC
  message, status = cli.explain(error.value)
  assert message.startswith(f"no space left on device while writing {directory}/"), message
  assert "\n" not in message and status == 1
  log = certlog.read_log(path)   # readable on the full disk
  assert set(written) <= set(log["idx"].tolist()) and len(log["idx"]) <= len(written) + 1
  free()
  with certlog.LogWriter(path) as writer:   # resumes: a torn row moves aside, nothing else
    assert set(written) <= writer.done
    writer.write(written[-1] + 1, label=1, predict=1, correct=True, seconds=1.0,
                 radius=0.125) if written[-1] + 1 not in writer.done else None
  log = certlog.read_log(path)
  assert log["radius"][0] == 0.25 and len(log["idx"]) >= len(written) + 1
  assert certlog.read_settings(path) == json.loads(json.dumps(SETTINGS))


def _sync(path):
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def test_metrics_on_a_full_disk_are_one_sentence_and_keep_every_row(full_disk):
  from rrcm_jax import cli  # pylint: disable=g-import-not-at-top
  directory, fill, free = full_disk
  writer = workdir_lib.JsonLinesWriter(directory)
  writer.write_scalars(0, {"loss": 1.0})
  fill()
  written = [0]
  with pytest.raises(OSError) as error:
    for step in range(1, 1_000_000):
      writer.write_scalars(step, {"loss": 1.0 / step, "images_per_s": 123.25})
      if not os.path.exists(directory / "filler"):   # the stub: fsync is where it fails
        _sync(str(directory / "metrics.jsonl"))
      written.append(step)
  message, status = cli.explain(error.value)
  assert message.startswith("no space left on device while writing "), message
  assert "metrics.jsonl" in message and status == 1
  rows = workdir_lib.read_metrics(directory)
  assert [r["step"] for r in rows][:len(written)] == written
  free()



def test_the_trainers_asynchronous_metrics_writer_on_a_full_disk_is_one_sentence(full_disk):
  from rrcm_jax import cli  # pylint: disable=g-import-not-at-top
  directory, fill, free = full_disk
  if not (directory / "filler").parent.is_mount():
    pytest.skip("needs a small tmpfs (root)")
  writer = workdir_lib.MetricsWriter(directory)   # CLU's writer thread where CLU is installed
  fill()
  with pytest.raises(Exception) as error:
    # A flush per row, as the trainer's log interval gives: unflushed, a fast loop queues
    # every row on the writer thread before the disk fills, and each then fails in turn.
    for step in range(10_000):
      writer.write(step, {"loss": 1.0, "images_per_s": 123.25})
      writer.flush()
    writer.close()
  message, status = cli.explain(error.value)
  assert message.startswith(f"no space left on device while writing {directory}/"), message
  assert "\n" not in message and status == 1
  steps = [r["step"] for r in workdir_lib.read_metrics(directory)]
  assert steps == list(range(len(steps))) and steps   # every row before the full disk
  free()
