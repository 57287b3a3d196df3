"""The command line shared by the entry points: `--config` (an ml_collections
config file, every key overridable as `--config.a.b=v`) and `--workdir`.

jax.distributed starts here, before anything touches a device, and a bad
config or input ends the program with one sentence instead of a traceback.
A run stopped by SIGTERM (`loop.Preempted`, checkpoint written) exits 75.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rrcm_jax import loop, parallel


def run(main, argv, workdir_help="directory for checkpoints, logs and metrics (local or gs://)"):
  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:arg])",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def checked_main(args):
    if not flags.FLAGS["verbosity"].present:   # Orbax logs every save at INFO
      logging.set_verbosity(logging.WARNING)
    parallel.initialize_distributed()
    try:
      main(args)
    except loop.Preempted:   # checkpointed: "preempted, rerun to resume" for the scheduler
      sys.exit(loop.EX_TEMPFAIL)
    except (ValueError, FloatingPointError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  def parse(args):   # an unknown or ill-typed key becomes one sentence, not a traceback
    try:
      return flags.FLAGS(args)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
      text = str(e)
      if "Traceback" in text:   # an exception inside the config file: keep its last line
        text = [l for l in text.replace("\\n", "\n").splitlines() if l.strip()][-1]
      message = " ".join(text.replace("\\n", " ").replace("'", "").replace("\\", "").strip('" ').split())
      print(f"error: bad command line: {message} (keys and types are those of the config file "
            "given with --config).", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(checked_main, argv, flags_parser=parse)
