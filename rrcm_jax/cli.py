"""The command line shared by the entry points: `--config` (an ml_collections
config file, every key overridable as `--config.a.b=v`) and `--workdir`.

jax.distributed starts here, before anything touches a device. Every
anticipated error ends the program with one sentence on stderr and a status
that scripts and schedulers can act on (`explain`):

  0   finished
  2   bad input: config, command line, data, a file that is missing or not
      valid JSON, a checkpoint that does not fit the config; divergence
  65  no intact checkpoint to resume from (`checkpoints.CheckpointDamaged`)
  69  the workdir is in use by another run (`workdir.WorkdirBusy`)
  75  preempted (SIGTERM), checkpoint written: rerun the same command to resume
  1   anything else (disk full, an unexpected error: its traceback, then one sentence)
"""
import difflib
import errno
import json
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from rrcm_jax import loop, parallel

EX_FAILURE, EX_USAGE = 1, 2


def run(main, argv, workdir_help="directory for checkpoints, logs and metrics (local or gs://)"):
  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:arg])",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def checked_main(args):
    if not flags.FLAGS["verbosity"].present:   # Orbax logs every save at INFO
      logging.set_verbosity(logging.WARNING)
    try:
      parallel.initialize_distributed()
      main(args)
    except Exception as e:  # pylint: disable=broad-except  (each becomes a status, see explain)
      message, status = explain(e)
      if not anticipated(e):
        traceback.print_exc()   # unexpected: the traceback is for whoever fixes it
      prefix = "" if status == loop.EX_TEMPFAIL else "error: "   # "preempted: ..., rerun"
      print(f"{prefix}{message}", file=sys.stderr, flush=True)
      sys.exit(status)

  def parse(args):   # an unknown or ill-typed key becomes one sentence, not a traceback
    try:
      parsed = flags.FLAGS(args)
      flags.FLAGS.config.keys()   # a file that failed to load raises here, not in main
      return parsed
    except Exception as e:  # pylint: disable=broad-except
      print(f"error: {command_line_error(e, args)}", file=sys.stderr, flush=True)
      sys.exit(EX_USAGE)

  app.run(checked_main, argv, flags_parser=parse)


# ----------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------
def _one_line(text):
  return " ".join(str(text).replace("\\n", " ").split())


def command_line_error(error, args=()):
  """One sentence for an error while parsing the command line or loading --config."""
  text = str(error)
  config_arg = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
  missing = re.search(r"No such file or directory: '([^']*)'", text)
  if missing or (config_arg and "failure to load" in text and "Errno 2" in text):
    name = missing.group(1) if missing else config_arg
    return (f"--config={config_arg or name}: no such config file {name!r}; give a file of "
            "configs/ (e.g. --config=configs/fashion_mnist_pretrain.py).")
  unknown = re.search(r"Unknown command line flag '(config\.[^']+)'", text)
  if unknown:
    return (f"unknown config key '{unknown.group(1)}': the config file given with --config has "
            "no such key.")
  if isinstance(error, (AttributeError, KeyError)) or isinstance(error.__context__, KeyError):
    # ml_collections says: Key "x" does not exist ..., or 'x' ... Did you mean "y" instead of "x"?
    named = (re.search(r'[Kk]ey \\*"([\w.]+)\\*"', text)
             or re.search(r'instead of \\*"([\w.]+)\\*"', text)
             or re.search(r"'([\w.]+)\\*'", text))
    key = named.group(1) if named else text.strip("\"' ")
    flag = next((a.split("=", 1)[0][2:] for a in args
                 if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")),
                f"config.{key}")
    hint = re.search(r"Did you mean \"?([\w.]+)\"?", text.replace("'", '"'))
    return (f"unknown config key '{flag}'" + (f" (did you mean '{hint.group(1)}'?)" if hint else "")
            + ": the config file given with --config has no such key.")
  if "Traceback" in text:   # an exception inside the config file: keep its last line
    text = [l for l in text.replace("\\n", "\n").splitlines() if l.strip()][-1]
  message = _one_line(text.replace("'", "").replace("\\", "").strip('" '))
  return (f"bad command line: {message} (keys and types are those of the config file given "
          "with --config).")


# ----------------------------------------------------------------------------
# Errors of a run.
# ----------------------------------------------------------------------------
def _chain(error):
  """`error` and the exceptions it was raised from or during, outermost first."""
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def _traceback_modules(error):
  modules = []
  tb = error.__traceback__
  while tb is not None:
    modules.append(tb.tb_frame.f_globals.get("__name__", ""))
    tb = tb.tb_next
  return modules


def file_in_traceback(error, suffixes=None):
  """The file a failing read or write was about: the error's own filename, else the
  innermost frame's open file object or path-like local (ending in `suffixes` if given)."""
  if getattr(error, "filename", None):
    return str(error.filename)
  frames = []
  tb = error.__traceback__
  while tb is not None:
    frames.append(tb.tb_frame)
    tb = tb.tb_next
  for frame in reversed(frames):
    for name, value in frame.f_locals.items():
      candidate = None
      if hasattr(value, "write") and isinstance(getattr(value, "name", None), str):
        candidate = value.name
      elif name == "self" and isinstance(getattr(value, "path", None), (str, os.PathLike)):
        candidate = os.fspath(value.path)   # a writer's own file (certlog.LogWriter, ...)
      elif isinstance(value, os.PathLike) or (isinstance(value, str) and name in (
          "path", "filename", "file", "sidecar", "target", "temporary", "source", "directory")):
        candidate = os.fspath(value)
      if candidate and (suffixes is None or str(candidate).endswith(suffixes)):
        return str(candidate)
  return None


def unknown_dataset(name, known=None):
  """"unknown dataset 'x'; did you mean 'y'?" (the closest of TFDS's names, never the list)."""
  if known is None:
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      known = tfds.list_builders()
    except Exception:  # pylint: disable=broad-except
      known = []
  known = list(known) + ["folder", "synthetic"]
  close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
  hint = f"did you mean '{close[0]}'?" if close else ("config.data.name takes a TFDS name, "
                                                      "'folder' or 'synthetic'.")
  return f"unknown dataset '{name}'; {hint}"


def _dataset_not_found(error):
  for e in _chain(error):
    if type(e).__name__ == "DatasetNotFoundError":
      found = re.search(r"Dataset (\S+) not found", str(e))
      return found.group(1) if found else str(e).split()[0]
  return None


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _path_in_text(text):
  """The first absolute path or gs:// URI in an error message, or None: one that starts
  the text or follows a space or quote (TensorFlow's "device_/job:localhost/..." is not one)."""
  found = re.search(r"(?:^|[\s\"'(])((?:gs://|/)[^\s\"';,]+)", text)
  return found.group(1) if found else None


def _full_disk_path(error):
  """Where a full disk without an errno struck: the path in the message when it lies inside
  the traceback's file or folder (or the traceback names none), else the traceback's."""
  stated = _path_in_text(str(error))
  seen = file_in_traceback(error)
  if seen and not seen.startswith(("/", "gs://")):
    seen = None   # a bare word, not a path
  if stated and (seen is None or stated.startswith(seen.rstrip("/") + "/")):
    return stated
  return seen or stated or "the workdir"


def _os_error(error):
  where = file_in_traceback(error)
  if error.errno in _DISK_FULL:
    what = "no space left on device" if error.errno == errno.ENOSPC else "disk quota exceeded"
    return (f"{what} while writing {where or 'the workdir'}; what was written before is "
            "intact: free space and rerun the same command to resume."), EX_FAILURE
  reason = error.strerror or type(error).__name__
  target = f" {where}" if where else ""
  if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError)):
    return f"{reason.lower()}:{target or ' ' + str(error)}.", EX_USAGE
  return f"{reason.lower()}:{target or ' ' + _one_line(error)}.", EX_FAILURE


def explain(error):
  """(one-sentence message, exit status) for an exception that ended a run."""
  if isinstance(error, loop.Preempted):
    return _one_line(error), loop.EX_TEMPFAIL
  chain = _chain(error)   # a full disk, also when a writer thread's error wraps it
  for cause in chain:
    if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
      return _os_error(cause)
  for cause in chain:
    if "No space left on device" in str(cause):   # TensorStore's, TensorFlow's: no errno
      where = _full_disk_path(cause)
      return (f"no space left on device while writing {where}; what was written before is "
              "intact: free space and rerun the same command to resume."), EX_FAILURE
  if type(error).__name__ == "AsyncError" and (error.__cause__ or error.__context__):
    return explain(error.__cause__ or error.__context__)   # CLU's writer thread: its error
  dataset = _dataset_not_found(error)
  if dataset is not None:
    return unknown_dataset(dataset), EX_USAGE
  if isinstance(error, json.JSONDecodeError):
    where = file_in_traceback(error) or "a JSON file"
    return (f"{where} is not valid JSON ({error.msg} at line {error.lineno}, column "
            f"{error.colno}); restore it or move it aside."), EX_USAGE
  if hasattr(error, "exit_code"):   # CheckpointDamaged 65, WorkdirBusy 69, ...
    return _one_line(error), int(error.exit_code)
  if isinstance(error, OSError) and error.errno is not None:
    return _os_error(error)
  modules = _traceback_modules(error)
  if any(m.startswith(("orbax", "tensorstore")) for m in modules):
    where = file_in_traceback(error) or "its checkpoint directory"
    first = (_one_line(error) or type(error).__name__)[:300]
    return f"reading or writing a checkpoint in {where} failed ({first}).", EX_FAILURE
  if isinstance(error, (ValueError, FloatingPointError)):
    return _one_line(error), EX_USAGE
  return _unexpected(error), EX_FAILURE


def _unexpected(error):
  return f"{type(error).__name__}: {_one_line(error)[:500]}"


def anticipated(error):
  """Whether `explain` has a sentence for `error` of its own (else the traceback helps)."""
  return explain(error)[0] != _unexpected(error)
