"""The command line's errors: one sentence and a distinct exit status each; checks a run
makes before it writes anything (schedule keys, batch sizes, learning rates, resuming with
the settings its checkpoints were made with)."""
import errno
import json
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from configs import common
from rrcm_jax import checkpoints, cli, config_checks, loop
from rrcm_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _raised(fn, *args):
  try:
    fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    return e
  raise AssertionError("nothing was raised")


def _one_sentence(message):
  assert "\n" not in message and message.rstrip().endswith((".", "?")), message
  assert "Traceback" not in message


# ----------------------------------------------------------------------------
# Exit statuses.
# ----------------------------------------------------------------------------
def test_each_kind_of_error_has_its_own_status():
  statuses = {
      "preempted": cli.explain(loop.Preempted(7))[1],
      "bad input": cli.explain(ValueError("config.x=1 must be 2."))[1],
      "diverged": cli.explain(FloatingPointError("training diverged at step 3."))[1],
      "damaged": cli.explain(checkpoints.CheckpointDamaged("no checkpoint is intact."))[1],
      "busy": cli.explain(workdir_lib.WorkdirBusy("in use by pid 1."))[1],
      "other": cli.explain(RuntimeError("boom"))[1],
  }
  assert statuses == {"preempted": 75, "bad input": 2, "diverged": 2, "damaged": 65, "busy": 69,
                      "other": 1}
  message, _ = cli.explain(loop.Preempted(7))
  assert "step 7" in message and "rerun" in message
  assert cli.anticipated(ValueError("x")) and not cli.anticipated(RuntimeError("boom"))


def _write_rows_until_full(path, rows):
  with open(path, "a") as f:
    for row in rows:
      f.write(row)
      f.flush()
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_names_the_file_being_written(tmp_path):
  target = tmp_path / "metrics.jsonl"
  message, status = cli.explain(_raised(_write_rows_until_full, str(target), ["{}\n"]))
  assert message.startswith(f"no space left on device while writing {target};"), message
  assert status == 1
  _one_sentence(message)


def _save_checkpoint(directory):
  raise ValueError("Error writing local file \"/x/d/abc\": No space left on device "
                   "[tensorstore_spec='...']")


def test_disk_full_inside_a_checkpoint_library_is_the_same_sentence(tmp_path):
  directory = tmp_path / "checkpoints"
  message, status = cli.explain(_raised(_save_checkpoint, str(directory)))
  assert message.startswith(f"no space left on device while writing {directory};"), message
  assert status == 1


def _flush_events(directory):
  raise RuntimeError("{{function_node __wrapped__FlushSummaryWriter_device_/job:localhost/replica:"
                     f"0/task:0/device:CPU:0}}}} {directory}/tensorboard/events.out.tfevents.1.v2; "
                     "No space left on device")


def test_disk_full_in_tensorflows_writer_names_its_events_file(tmp_path):
  message, status = cli.explain(_raised(_flush_events, str(tmp_path)))
  assert message.startswith(
      f"no space left on device while writing {tmp_path}/tensorboard/events.out.tfevents.1.v2;"
  ), message
  assert status == 1
  _one_sentence(message)


def _read_json(path):
  return json.loads(pathlib.Path(path).read_text())


def test_malformed_json_names_the_file(tmp_path):
  path = tmp_path / "certify_sigma0.25.json"
  path.write_text('{"settings": {"n": 100,')
  message, status = cli.explain(_raised(_read_json, path))
  assert str(path) in message and "not valid JSON" in message and status == 2
  _one_sentence(message)


def test_missing_file_is_bad_input(tmp_path):
  message, status = cli.explain(_raised(open, str(tmp_path / "absent.pth")))
  assert status == 2 and "absent.pth" in message
  _one_sentence(message)


def test_unknown_dataset_suggests_the_closest_name():
  assert (cli.unknown_dataset("fashon_mnist", ["mnist", "fashion_mnist", "cifar10"]) ==
          "unknown dataset 'fashon_mnist'; did you mean 'fashion_mnist'?")
  far = cli.unknown_dataset("zzzzqqq", ["mnist", "cifar10"])
  assert far.startswith("unknown dataset 'zzzzqqq';") and "mnist" not in far


def test_tfds_unknown_dataset_through_the_data_layer_is_one_sentence():
  pytest.importorskip("tensorflow_datasets")
  from rrcm_jax.data import sources  # pylint: disable=g-import-not-at-top
  error = _raised(sources._tfds_builder, "fashon_mnist", None)  # pylint: disable=protected-access
  message, status = cli.explain(error)
  assert message == "unknown dataset 'fashon_mnist'; did you mean 'fashion_mnist'?"
  assert status == 2


def test_a_checkpoint_that_does_not_fit_is_one_sentence_naming_step_and_directory(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ckpt = checkpoints.Checkpointer(tmp_path, latest_every=1)
  ckpt.save(3, {"w": jnp.zeros((30,))})
  ckpt.close()
  ckpt = checkpoints.Checkpointer(tmp_path, latest_every=1)
  try:
    error = _raised(ckpt.restore, {"w": jax.ShapeDtypeStruct((7, 2), jnp.float32)})
  finally:
    ckpt.close()
  message, status = cli.explain(error)
  assert status == 2 and message.startswith(f"checkpoint step 3 in {ckpt.directory} could not "
                                            "be restored into this run's state ("), message
  _one_sentence(message)


def test_command_line_errors():
  unknown = cli.command_line_error(
      AttributeError("\"'widht'\""), ["--config=c.py", "--config.model.widht=3"])
  assert unknown.startswith("unknown config key 'config.model.widht'"), unknown
  flag = cli.command_line_error(Exception("Unknown command line flag 'config.nope'"), [])
  assert flag.startswith("unknown config key 'config.nope'")
  missing = cli.command_line_error(
      OSError("Configuration is not available because of an earlier failure to load: "
              "[Errno 2] No such file or directory: 'configs/nope.py'"),
      ["--config=configs/nope.py"])
  assert missing.startswith("--config=configs/nope.py: no such config file 'configs/nope.py'")
  for message in (unknown, flag, missing):
    _one_sentence(message)


# ----------------------------------------------------------------------------
# Checks before anything is written.
# ----------------------------------------------------------------------------
def _pretrain():
  return common.demo_pretrain_config()


@pytest.mark.parametrize("key,value,allowed", [
    ("log_every", 0, "an integer >= 1"),
    ("knn_every", -1, "or 0 (off)"),
    ("latest_every", 0, "or None"),
    ("total_steps", 0, "an integer >= 1"),
    ("batch_size", 0, "an integer > 0"),
    ("optim.lr", 0.0, "a finite number > 0"),
    ("optim.lr", float("nan"), "a finite number > 0"),
])
def test_validate_training_names_the_key(key, value, allowed):
  config = _pretrain()
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match="^" + re.escape(f"config.{key}={value!r} must be ") + ".*"
                     + re.escape(allowed)):
    config_checks.validate_training(config)


def test_validate_training_accepts_off_and_defaults_and_checks_divisibility():
  config = _pretrain()
  config.knn_every = 0
  config_checks.validate_training(config, device_count=1)
  finetune = common.finetune_config(common.setup("fashion_mnist"), sigma=0.25, epochs=0,
                                    warmup_epochs=0, batch_size=64, lr=1e-3, layer_decay=0.65)
  with pytest.raises(ValueError, match=r"^config.epochs=0 must be an integer >= 1"):
    config_checks.validate_training(finetune)
  finetune.epochs = 2
  with pytest.raises(ValueError, match=r"config.batch_size=64 must be divisible by the number "
                     r"of devices \(3\), e.g. 63"):
    config_checks.validate_training(finetune, device_count=3)


def _resumable_workdir(tmp_path, config):
  tmp_path.mkdir(parents=True, exist_ok=True)
  (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
  (tmp_path / "checkpoints" / "100").mkdir(parents=True)
  return tmp_path


def test_a_resumed_run_with_other_binding_settings_stops_unless_allowed(tmp_path):
  workdir = _resumable_workdir(tmp_path, _pretrain())
  config_checks.check_resume(workdir, _pretrain())   # same settings: resumes
  changed = _pretrain()
  changed.batch_size = 2 * changed.batch_size
  changed.log_every = 7   # not binding
  with pytest.raises(ValueError, match=r"made with batch_size=\d+ and this run has batch_size="
                     r"\d+; .* --config.allow_changes=batch_size\.$"):
    config_checks.check_resume(workdir, changed)
  changed.allow_changes = "batch_size"
  config_checks.check_resume(workdir, changed)
  changed.model.width = 32
  changed.optim.lr = 1.0
  with pytest.raises(ValueError, match=r"model.width=64 and this run has model.width=32 \(and 1 "
                     "more\\)"):
    config_checks.check_resume(workdir, changed)
  changed.allow_changes = "batch_size,model,optim.lr"
  config_checks.check_resume(workdir, changed)
  changed.allow_changes = "log_every"
  with pytest.raises(ValueError, match="names 'log_every', which is not a setting"):
    config_checks.check_resume(workdir, changed)


def test_allowing_total_steps_allows_what_follows_it(tmp_path):
  workdir = _resumable_workdir(tmp_path, _pretrain())
  longer = _pretrain()
  longer.total_steps = 3 * longer.total_steps   # the warm-up and EMA horizons follow it
  with pytest.raises(ValueError, match=r"made with total_steps=\d+ and this run has "
                     r"total_steps=\d+ \(and \d+ more\); .*allow_changes=total_steps\.$"):
    config_checks.check_resume(workdir, longer)
  longer.allow_changes = "total_steps"
  config_checks.check_resume(workdir, longer)
  longer.optim.warmup_steps = 3   # set by hand: not explained by total_steps
  with pytest.raises(ValueError, match=r"optim.warmup_steps=\d+ and this run has "
                     r"optim.warmup_steps=3;"):
    config_checks.check_resume(workdir, longer)


def test_a_fresh_workdir_or_one_without_checkpoints_is_not_checked(tmp_path):
  (tmp_path / "config.json").write_text(_pretrain().to_json_best_effort())
  changed = _pretrain()
  changed.seed = 5
  config_checks.check_resume(tmp_path, changed)   # no checkpoint: nothing to resume
  config_checks.check_resume(tmp_path / "new", changed)
  assert not (tmp_path / "new").exists()


def test_configs_offer_allow_changes():
  assert _pretrain().allow_changes == ""
  assert isinstance(ml_collections.ConfigDict(_pretrain()).get("allow_changes"), str)


# ----------------------------------------------------------------------------
# The command line end to end.
# ----------------------------------------------------------------------------
def _cli(module, workdir, *overrides, config="configs/fashion_mnist_pretrain.py"):
  return subprocess.run([sys.executable, "-m", module, f"--config={config}",
                         f"--workdir={workdir}", *overrides], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _last_line(proc):
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error: ")]
  assert lines, proc.stderr[-3000:]
  return lines[-1]


@pytest.mark.slow
def test_cli_statuses_and_nothing_written_on_bad_input(tmp_path):
  # a bad value: stops before the workdir is even created
  fresh = tmp_path / "fresh"
  proc = _cli("rrcm_jax.pretrain", fresh, "--config.log_every=0")
  assert proc.returncode == 2 and "config.log_every=0 must be" in _last_line(proc)
  assert not fresh.exists()
  # an unknown key, a missing config file
  proc = _cli("rrcm_jax.pretrain", fresh, "--config.log_evry=5")
  assert proc.returncode == 2 and "unknown" in _last_line(proc)
  proc = _cli("rrcm_jax.certify", fresh, config="configs/nope.py")
  assert proc.returncode == 2 and "no such config file 'configs/nope.py'" in _last_line(proc)
  assert "Traceback" not in proc.stderr and not fresh.exists()
  # a workdir holding a run: an unknown dataset leaves its config.json as it was
  done = tmp_path / "done"
  done.mkdir()
  recorded = '{"note": "the finished run"}\n'
  (done / "config.json").write_text(recorded)
  proc = _cli("rrcm_jax.pretrain", done, "--config.data.name=fashon_mnist")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert _last_line(proc) == "error: unknown dataset 'fashon_mnist'; did you mean 'fashion_mnist'?"
  assert (done / "config.json").read_text() == recorded and not (done / "runs.jsonl").exists()
  # resuming with another batch size names the key; a held workdir is 69
  resumed = _resumable_workdir(tmp_path / "resumed", _pretrain())
  proc = _cli("rrcm_jax.pretrain", resumed, "--config.batch_size=8")
  assert proc.returncode == 2 and "and this run has batch_size=8" in _last_line(proc)
  with workdir_lib.lock(resumed):
    proc = _cli("rrcm_jax.pretrain", resumed)
  assert proc.returncode == 69 and f"pid {os.getpid()} on host" in _last_line(proc)
