r"""The replication experiment: rRCM vs Gaussian augmentation vs consistency regularization
vs diffusion denoised smoothing (DDS) at equal training FLOPs.

  mkdir -p results/replication
  nohup python -m experiments.replication --root results/replication \
      > results/replication/log.txt 2>&1 &

Runs every stage of configs/fashion_mnist_replication.py as its own CLI call
(`python -m rrcm_jax.pretrain / finetune / diffusion / certify
--config=configs/fashion_mnist_replication.py:stage=...`), in this order:

  1. the one rRCM pre-training (shared by every σ), after the offline TFDS preparation of
     Fashion-MNIST only where TFDS reads it (`replication_data`: without IDX files; with
     them every stage reads them on the device pipeline and none needs TensorFlow);
  2. rRCM's fine-tuning at the first σ from each start (`init=` ema, online, ema_debiased;
     --inits names fewer);
     the start with the best validation accuracy at model-space noise s = 2σ is the one
     used from then on (`choose_init`);
  3. per σ: the chosen rRCM fine-tuning (beyond the first σ), the two baselines, and the
     certification of each;
  4. DDS: the clean classifier at each budget share of rep.CLEAN_SHARES, the share where its
     validation accuracy saturates chosen (`choose_share`), the denoiser on the rest of the
     budget, then DDS's certification per σ on every 4th of the certified images;
  5. the budget multiples of --budget-scales (default 4) at the last σ: rRCM (pre-training
     and fine-tuning × the multiple, then its certification), then consistency
     regularization (steps × the multiple, then its certification).

The plan is recomputed after every stage, so the choices of 2 and 4 take effect as soon as
their runs are complete. Running the same command again resumes: a stage whose output is
complete is skipped (pre-training and denoiser: the final checkpoint; fine-tuning:
test_results.json; certification: the report written after its last image), an
interrupted one resumes from its own checkpoint or log. Every start, end and skip goes to
<root>/stages.jsonl with the exact command, seed and wall time; after every stage
<root>/summary.md is rewritten (`experiments.replication_summary`).

Options: --sigmas 0.25,0.5  --methods rrcm,gaussian,consistency,dds  --budget-scales 4
(comma-separated; 4,16 adds the 16× point; "none" for none)  --inits ema,online,ema_debiased
(rRCM's starts tried at the first σ; one start is no choice)  --arrays DIR (a folder of the
Fashion-MNIST IDX files, train-*-ubyte[.gz] and t10k-*-ubyte[.gz], for every stage:
config data.arrays; default Debian's /usr/share/datasets/fashion-mnist, else TFDS)
--quick (every stage for a few steps, images and samples: the smoke test)  --data synthetic
(generated images instead of Fashion-MNIST, on the tf.data pipeline: needs TensorFlow).
"""
import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from configs import common
from configs import fashion_mnist_replication as rep
from experiments import replication_data as data_lib
from rrcm_jax import workdir as workdir_lib

CONFIG = "configs/fashion_mnist_replication.py"
ARMS = rep.METHODS + ("dds",)
SCALED_METHODS = ("rrcm", "consistency")   # the arms of the larger-budget points
SATURATION = 0.005   # DDS: a classifier share within this of the best validation accuracy
LABELS = {"rrcm": "rRCM (pre-training + consistency fine-tuning)",
          "gaussian": "Gaussian augmentation from scratch (Cohen et al.)",
          "consistency": "consistency regularization from scratch (Jeong & Shin)",
          "dds": "DDS (diffusion denoiser + clean classifier, Carlini et al.)"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# The plan: which CLI calls, in which order, and when each is complete.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Stage:
  """One CLI call. `arg` is the config argument (None for the data preparation);
  `flags` are further --config overrides of this stage."""
  name: str
  module: str
  arg: str = None
  workdir: str = None
  init_from: str = None
  flags: tuple = ()

  def argv(self, overrides=()):
    if self.arg is None:
      return [sys.executable, "-m", self.module, "fashion_mnist"]
    flags = [f"--config={CONFIG}:{self.arg}", f"--workdir={self.workdir}"]
    if self.init_from:
      flags.append(f"--config.init_from={self.init_from}")
    return [sys.executable, "-m", self.module, *flags, *self.flags, *overrides]

  def config(self):
    return rep.get_config(self.arg)


def scaled(name, scale):
  """"rrcm_online" at budget multiple 4 -> "rrcm_online_x4"."""
  return name if scale == 1 else f"{name}_x{scale}"


def rrcm_name(init):
  return f"rrcm_{init}"


def pretrain_dir(root, scale=1):
  return os.path.join(root, scaled("pretrain", scale))


def finetune_dir(root, method, sigma, scale=1):
  """method: "gaussian", "consistency", "rrcm_<init>" (or "rrcm", the earlier run's)."""
  return os.path.join(root, f"{scaled(method, scale)}_sigma{sigma}")


def certify_dir(root, method, sigma, scale=1):
  return os.path.join(root, f"certify_{scaled(method, scale)}_sigma{sigma}")


def certify_log(root, method, sigma, scale=1):
  return os.path.join(certify_dir(root, method, sigma, scale), f"certify_sigma{float(sigma)}.tsv")


def clean_dir(root, share):
  """DDS's clean classifier trained on `share` of the budget."""
  return os.path.join(root, f"dds_classifier_share{share}")


def denoiser_dir(root, classifier_share):
  """DDS's denoiser: the budget the classifier at `classifier_share` leaves."""
  return os.path.join(root, f"dds_denoiser_share{1 - classifier_share}")


def finished(workdir):
  return os.path.exists(os.path.join(workdir, "test_results.json"))


def last_validation(workdir, key):
  """The last validation record's `key` ("val/clean", "val/noisy_0.5", …) of a fine-tuning
  workdir: the accuracy of the last checkpoint, the one certified."""
  value = next((r[key] for r in reversed(workdir_lib.read_metrics(workdir)) if key in r), None)
  if value is None:
    raise ValueError(f"{workdir} has test_results.json but no validation record {key}; "
                     "its metrics.jsonl is incomplete.")
  return value


def init_key(sigma):
  """The validation metric rRCM's start is chosen on: accuracy at model-space s = 2σ."""
  return f"val/noisy_{2 * float(sigma)}"


def starts(args):
  """rRCM's starts tried at the first σ (--inits, in rep.INITS order; all of them by default)."""
  return tuple(getattr(args, "inits", None) or rep.INITS)


def choose_init(root, sigma, inits=rep.INITS):
  """(the start of rRCM with the best validation accuracy at s = 2σ, {init: that accuracy})
  over the fine-tunings `rrcm_<init>_sigma<σ>` of `inits`; the choice is None until
  all of them are complete (ties: the first of `inits`)."""
  inits = tuple(inits)
  done = {i: finished(finetune_dir(root, rrcm_name(i), sigma)) for i in inits}
  values = {i: last_validation(finetune_dir(root, rrcm_name(i), sigma), init_key(sigma))
            for i in inits if done[i]}
  if len(values) < len(inits):
    return None, values
  return max(inits, key=lambda i: (values[i], -inits.index(i))), values


def choose_share(root):
  """(the clean classifier's budget share for DDS, {share: its validation clean accuracy}):
  the smallest of rep.CLEAN_SHARES within SATURATION of the best, None until all are complete."""
  values = {sh: last_validation(clean_dir(root, sh), "val/clean")
            for sh in rep.CLEAN_SHARES if finished(clean_dir(root, sh))}
  if len(values) < len(rep.CLEAN_SHARES):
    return None, values
  best = max(values.values())
  return min(sh for sh, v in values.items() if v >= best - SATURATION), values


def certify_stage(root, method, sigma, quick, scale=1):
  return Stage(f"certify_{scaled(method, scale)}_sigma{sigma}", "rrcm_jax.certify",
               rep.config_arg("certify", sigma, quick), certify_dir(root, method, sigma, scale),
               finetune_dir(root, method, sigma, scale))


def finetune_stage(root, method, sigma, quick, init=None, scale=1):
  """The fine-tuning of `method` ("rrcm" with its `init`) at `sigma`."""
  init = init if method == "rrcm" else None
  name = rrcm_name(init) if method == "rrcm" else method
  return Stage(f"{scaled(name, scale)}_sigma{sigma}", "rrcm_jax.finetune",
               rep.config_arg(method, sigma, quick, init=init, scale=scale),
               finetune_dir(root, name, sigma, scale),
               pretrain_dir(root, scale) if method == "rrcm" else None)


def dds_stages(root, sigmas, quick, share):
  """The clean classifiers, and once `share` is chosen the denoiser and certifications."""
  stages = [Stage(f"dds_classifier_share{sh}", "rrcm_jax.finetune",
                  rep.config_arg("clean", quick=quick, share=sh), clean_dir(root, sh))
            for sh in rep.CLEAN_SHARES]
  if share is None:
    return stages
  denoiser = denoiser_dir(root, share)
  stages.append(Stage(os.path.basename(denoiser), "rrcm_jax.diffusion",
                      rep.config_arg("denoiser", quick=quick, share=share), denoiser))
  for sigma in sigmas:
    stages.append(Stage(f"certify_dds_sigma{sigma}", "rrcm_jax.certify",
                        rep.config_arg("dds_certify", sigma, quick), certify_dir(root, "dds", sigma),
                        flags=(f"--config.dds.denoiser={denoiser}",
                               f"--config.dds.classifier={clean_dir(root, share)}")))
  return stages


def plan(root, sigmas, methods, quick, data, scales=(), init=None, share=None,
         inits=rep.INITS, prepare=False):
  """The stages, in order (module docstring). `init` / `share`: the choices of rRCM's start
  and DDS's classifier share; None leaves out the stages that need them. `inits`: the
  starts tried; `prepare`: whether the TFDS preparation of Fashion-MNIST comes first
  (`replication_data.reads_tfds`)."""
  tfds = prepare and data == "fashion_mnist"
  stages = [Stage("prepare", "rrcm_jax.data.prepare")] if tfds else []
  rrcm = "rrcm" in methods
  if rrcm:
    stages.append(Stage("pretrain", "rrcm_jax.pretrain", rep.config_arg("pretrain", quick=quick),
                        pretrain_dir(root)))
    stages += [finetune_stage(root, "rrcm", sigmas[0], quick, i) for i in inits]
  for sigma in sigmas:
    trained = [m for m in methods if m in rep.METHODS and (m != "rrcm" or init)]
    stages += [finetune_stage(root, m, sigma, quick, init) for m in trained
               if m != "rrcm" or sigma != sigmas[0]]
    stages += [certify_stage(root, rrcm_name(init) if m == "rrcm" else m, sigma, quick)
               for m in trained]
  if "dds" in methods:
    stages += dds_stages(root, sigmas, quick, share)
  sigma = sigmas[-1]
  for scale in scales:
    if rrcm:
      stages.append(Stage(scaled("pretrain", scale), "rrcm_jax.pretrain",
                          rep.config_arg("pretrain", quick=quick, scale=scale),
                          pretrain_dir(root, scale)))
    for m in SCALED_METHODS:   # each arm certified as soon as it is trained: a row per arm
      if m in methods and (m != "rrcm" or init):
        stages += [finetune_stage(root, m, sigma, quick, init, scale),
                   certify_stage(root, rrcm_name(init) if m == "rrcm" else m, sigma, quick, scale)]
  return stages


def current_plan(root, args):
  """`plan` with the choices the complete runs in `root` make so far."""
  init = choose_init(root, args.sigmas[0], starts(args))[0] if "rrcm" in args.methods else None
  share = choose_share(root)[0] if "dds" in args.methods else None
  return plan(root, args.sigmas, args.methods, args.quick, args.data, args.budget_scales,
              init, share, starts(args), data_lib.reads_tfds(args))


def is_complete(stage, records):
  """Whether a stage's output is complete (its CLI would do nothing)."""
  if stage.module in ("rrcm_jax.pretrain", "rrcm_jax.diffusion"):
    steps = stage.config().total_steps
    return os.path.isdir(os.path.join(stage.workdir, "checkpoints", str(steps)))
  if stage.module == "rrcm_jax.finetune":
    return finished(stage.workdir)
  if stage.module == "rrcm_jax.certify":
    sigma = stage.config().sigma
    return os.path.exists(os.path.join(stage.workdir, f"certify_sigma{float(sigma)}.md"))
  return any(r["stage"] == stage.name and r["status"] == "done" for r in records)


# ----------------------------------------------------------------------------
# Running: one subprocess per stage, recorded in stages.jsonl.
# ----------------------------------------------------------------------------
class Interrupted(Exception):
  """SIGTERM or Ctrl-C while a stage ran: it was stopped at a checkpoint."""


def read_records(root):
  path = os.path.join(root, "stages.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_record(root, **record):
  record = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), **record)
  with open(os.path.join(root, "stages.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")


def run_stage(root, stage, overrides, env, progress="", complete=None):
  """Runs one stage to completion; records it. Raises Interrupted or RuntimeError.

  complete: () -> whether the stage's output is complete (default `is_complete`).
  """
  argv = stage.argv(overrides)
  command = shlex.join(["python", *argv[1:]])   # as typed in the repository root
  seed = None if stage.arg is None else stage.config().seed
  record = dict(stage=stage.name, command=command, argv=argv, seed=seed, workdir=stage.workdir)
  print(f"\n=== {time.strftime('%H:%M:%S')}  {progress}{stage.name}: {command}", flush=True)
  append_record(root, status="started", **record)
  start = time.time()
  proc = subprocess.Popen(argv, cwd=REPO, env=env)
  try:
    returncode = proc.wait()
  except (KeyboardInterrupt, Interrupted):
    # stopping already: a repeated SIGTERM (`timeout` signals the driver, then its whole
    # process group) must not cut this short before the stage has stopped and is recorded
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    proc.send_signal(signal.SIGTERM)   # the CLIs checkpoint and stop at the next step
    proc.wait()
    append_record(root, status="interrupted", wall_s=round(time.time() - start, 1), **record)
    raise Interrupted(f"interrupted during {stage.name}; run the same command to resume.")
  if complete is None:
    complete = lambda: is_complete(stage, [dict(stage=stage.name, status="done")])
  complete = returncode == 0 and complete()
  preempted = returncode == 75   # EX_TEMPFAIL: checkpointed on SIGTERM, rerun to resume
  status = "done" if complete else "failed" if returncode and not preempted else "stopped"
  append_record(root, status=status, returncode=returncode, wall_s=round(time.time() - start, 1),
                **record)
  if returncode and not preempted:
    raise RuntimeError(f"stage {stage.name} failed (exit {returncode}); its command is in "
                       f"{root}/stages.jsonl. Fix the cause and run the same command to resume.")
  if not complete:   # SIGTERM sent to the stage itself: it checkpointed and exited 75
    raise Interrupted(f"stage {stage.name} stopped before completing; run the same command "
                      "to resume.")


def check_root(root, quick, data):
  """<root>/experiment.json pins quick and data: a root never mixes two kinds of run."""
  os.makedirs(root, exist_ok=True)
  path, ours = os.path.join(root, "experiment.json"), dict(quick=quick, data=data)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if {k: saved.get(k) for k in ours} != ours:
      raise ValueError(f"--root {root} holds a run with quick={saved.get('quick')}, "
                       f"data={saved.get('data')}; this one has quick={quick}, data={data}. "
                       "Use another --root.")
    return
  with open(path, "w") as f:
    json.dump(dict(ours, created=time.strftime("%Y-%m-%d %H:%M:%S")), f, indent=2)


# ----------------------------------------------------------------------------
# The summary.
# ----------------------------------------------------------------------------
def stage_walls(records):
  """{stage name: seconds} summed over every run of it (done, failed, interrupted)."""
  walls = {}
  for r in records:
    if "wall_s" in r:
      walls[r["stage"]] = walls.get(r["stage"], 0.0) + r["wall_s"]
  return walls


def stages_table(records, walls):
  """The Markdown of every stage run so far: last status, total wall time, seed, command
  (paths relative to the repository root, where the commands run)."""
  last = {r["stage"]: r for r in records if r["status"] != "skipped"}
  lines = ["## Stages", "", "| stage | status | wall min | seed | command |",
           "|---|---|---|---|---|"]
  for name, r in last.items():
    seed = "–" if r.get("seed") is None else r["seed"]
    lines.append(f"| {name} | {r['status']} | {walls.get(name, 0.0) / 60:.1f} | {seed} | "
                 f"`{r['command'].replace(REPO + os.sep, '')}` |")
  return lines


def write_summary(root, args):
  """Rewrites <root>/summary.md and its plots (`experiments.replication_summary`)."""
  from experiments import replication_summary  # pylint: disable=g-import-not-at-top
  replication_summary.write_summary(root, args)


def refresh_summary(root, args):
  """write_summary for the loop: a broken summary is reported, never stops the stages."""
  summarize_safely(lambda: write_summary(root, args))


def summarize_safely(write):
  """Calls write(); an error is a warning on stderr, but SIGTERM (Interrupted) still stops."""
  try:
    write()
  except Interrupted:   # SIGTERM while writing: stop like during a stage
    raise
  except Exception as e:  # pylint: disable=broad-except
    print(f"warning: summary.md not written ({type(e).__name__}: {e})", file=sys.stderr,
          flush=True)


# ----------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------
def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m experiments.replication",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, help="directory of every workdir and the summary")
  parser.add_argument("--sigmas", default=",".join(str(s) for s in rep.SIGMAS))
  parser.add_argument("--methods", default=",".join(ARMS))
  parser.add_argument("--budget-scales", "--budget-scale", dest="budget_scales", default="4",
                      help="budget multiples run at the last σ after everything at 1× "
                           f"(comma-separated, of {rep.SCALES[1:]}; 'none': none)")
  parser.add_argument("--inits", default=",".join(rep.INITS),
                      help="rRCM's starts tried at the first σ (comma-separated, of "
                           f"{rep.INITS}); the best on validation is kept")
  parser.add_argument("--arrays", default=None,
                      help="a folder of the Fashion-MNIST IDX files for every stage (config "
                           "data.arrays; default Debian's /usr/share/datasets/fashion-mnist, "
                           "else TFDS)")
  parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
  parser.add_argument("--data", default="fashion_mnist", choices=("fashion_mnist", "synthetic"))
  args = parser.parse_args(argv)
  try:
    args.sigmas = [common.check_sigma(float(s)) for s in args.sigmas.split(",")]
  except ValueError:
    parser.error(f"--sigmas must be a comma-separated list of {common.SIGMAS}, "
                 f"got {args.sigmas!r}.")
  args.methods = args.methods.split(",")
  if not args.methods or set(args.methods) - set(ARMS):
    parser.error(f"--methods must be a comma-separated list of {ARMS}, got "
                 f"{','.join(args.methods)!r}.")
  given = args.inits.split(",")
  if set(given) - set(rep.INITS):
    parser.error(f"--inits must be a comma-separated list of {rep.INITS}, got {args.inits!r}.")
  args.inits = [i for i in rep.INITS if i in given]
  if args.arrays is not None:
    if args.data != "fashion_mnist":
      parser.error(f"--arrays is for --data fashion_mnist, got --data {args.data}.")
    args.arrays = os.path.abspath(args.arrays)   # the stages run in the repository root
  text = args.budget_scales
  try:
    args.budget_scales = [] if text == "none" else [int(x) for x in text.split(",")]
  except ValueError:
    args.budget_scales = None
  if args.budget_scales is None or not set(args.budget_scales) <= set(rep.SCALES[1:]):
    parser.error(f"--budget-scales must be 'none' or a comma-separated list of "
                 f"{rep.SCALES[1:]}, got {text!r}.")
  return args


def record_data(root, args):
  """Prints and records (stages.jsonl, as a skipped "prepare") where Fashion-MNIST comes from
  when no TFDS preparation is needed."""
  if args.data != "fashion_mnist" or data_lib.reads_tfds(args):
    return
  _, kind, path = data_lib.data_source(args)
  reason = f"{kind} files in {path} on the device pipeline: no TFDS preparation"
  print(f"=== data: Fashion-MNIST from the {reason}", flush=True)
  append_record(root, stage="prepare", status="skipped", workdir=None, reason=reason)


def next_stage(root, args, checked):
  """(position, count, stage) of the first incomplete stage of the current plan, or None;
  complete stages not yet in `checked` are recorded as skipped."""
  stages = current_plan(root, args)
  for k, stage in enumerate(stages, start=1):
    if not is_complete(stage, read_records(root)):
      return k, len(stages), stage
    if stage.name not in checked:
      checked.add(stage.name)
      print(f"=== {stage.name} ({k}/{len(stages)}) is complete: skipped", flush=True)
      append_record(root, stage=stage.name, status="skipped", workdir=stage.workdir)
  return None


def main(argv=None):
  args = parse_args(argv)
  root = os.path.abspath(args.root)
  try:
    data_lib.check_data(args)
    check_root(root, args.quick, args.data)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  overrides = data_lib.data_overrides(args)
  record_data(root, args)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  def on_term(signum, frame):  # pylint: disable=unused-argument
    raise Interrupted("SIGTERM")
  signal.signal(signal.SIGTERM, on_term)
  start, checked, ran = time.time(), set(), 0
  try:
    while (todo := next_stage(root, args, checked)) is not None:
      k, count, stage = todo
      run_stage(root, stage, overrides if stage.arg else [], env, f"({k}/{count}) ")
      checked.add(stage.name)
      ran += 1
      refresh_summary(root, args)
  except (Interrupted, KeyboardInterrupt, RuntimeError, ValueError) as e:
    print(f"error: {e or 'interrupted'}", file=sys.stderr, flush=True)
    refresh_summary(root, args)
    return 1
  write_summary(root, args)
  print(f"\nall {len(checked)} stages complete ({ran} run, "
        f"{(time.time() - start) / 60:.1f} min in this call); summary: "
        f"{os.path.join(root, 'summary.md')}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
