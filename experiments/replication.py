r"""The replication experiment: rRCM vs Gaussian augmentation vs consistency regularization.

  mkdir -p results/replication
  nohup python -m experiments.replication --root results/replication \
      > results/replication/log.txt 2>&1 &

Runs every stage of configs/fashion_mnist_replication.py as its own CLI call
(`python -m rrcm_jax.pretrain / finetune / certify
--config=configs/fashion_mnist_replication.py:stage=...`), in this order: the
offline Fashion-MNIST preparation, the one rRCM pre-training (shared by every
σ), then per σ the three classifiers and their certifications. Running the
same command again resumes: a stage whose output is complete is skipped
(pre-training: its final checkpoint; fine-tuning: test_results.json;
certification: the report written after its last image), an interrupted one
resumes from its own checkpoint or log. Every start, end and skip goes to
<root>/stages.jsonl with the exact command, seed and wall time; after every
stage <root>/summary.md is rewritten (certified accuracy at radii 0 to 1.5
and ACR per σ and method, the classifiers' clean and noisy accuracies,
training FLOPs, wall times) with one plot per σ, <root>/certified_sigma<σ>.png.

Options: --sigmas 0.25,0.5  --methods rrcm,gaussian,consistency  --quick (every
stage for a few steps, images and samples: the smoke test)  --data synthetic
(generated images instead of Fashion-MNIST, for machines without it).
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

import numpy as np

from configs import common
from configs import fashion_mnist_replication as rep
from experiments import budgets
from rrcm_jax import certlog, report
from rrcm_jax import workdir as workdir_lib

CONFIG = "configs/fashion_mnist_replication.py"
RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
LABELS = {"rrcm": "rRCM (pre-training + consistency fine-tuning)",
          "gaussian": "Gaussian augmentation from scratch (Cohen et al.)",
          "consistency": "consistency regularization from scratch (Jeong & Shin)"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# The plan: which CLI calls, in which order, and when each is complete.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Stage:
  """One CLI call. `arg` is the config argument (None for the data preparation)."""
  name: str
  module: str
  arg: str = None
  workdir: str = None
  init_from: str = None

  def argv(self, overrides=()):
    if self.arg is None:
      return [sys.executable, "-m", self.module, "fashion_mnist"]
    flags = [f"--config={CONFIG}:{self.arg}", f"--workdir={self.workdir}"]
    if self.init_from:
      flags.append(f"--config.init_from={self.init_from}")
    return [sys.executable, "-m", self.module, *flags, *overrides]

  def config(self):
    return rep.get_config(self.arg)


def finetune_dir(root, method, sigma):
  return os.path.join(root, f"{method}_sigma{sigma}")


def certify_dir(root, method, sigma):
  return os.path.join(root, f"certify_{method}_sigma{sigma}")


def certify_log(root, method, sigma):
  return os.path.join(certify_dir(root, method, sigma), f"certify_sigma{float(sigma)}.tsv")


def plan(root, sigmas, methods, quick, data):
  """The stages, in order: preparation, pre-training, then per σ train and certify."""
  stages = [] if data != "fashion_mnist" else [Stage("prepare", "rrcm_jax.data.prepare")]
  pretrain_dir = os.path.join(root, "pretrain")
  if "rrcm" in methods:
    stages.append(Stage("pretrain", "rrcm_jax.pretrain", rep.config_arg("pretrain", quick=quick),
                        pretrain_dir))
  for sigma in sigmas:
    for method in methods:
      stages.append(Stage(f"{method}_sigma{sigma}", "rrcm_jax.finetune",
                          rep.config_arg(method, sigma, quick), finetune_dir(root, method, sigma),
                          pretrain_dir if method == "rrcm" else None))
    for method in methods:
      stages.append(Stage(f"certify_{method}_sigma{sigma}", "rrcm_jax.certify",
                          rep.config_arg("certify", sigma, quick), certify_dir(root, method, sigma),
                          finetune_dir(root, method, sigma)))
  return stages


def is_complete(stage, records):
  """Whether a stage's output is complete (its CLI would do nothing)."""
  if stage.module == "rrcm_jax.pretrain":
    steps = stage.config().total_steps
    return os.path.isdir(os.path.join(stage.workdir, "checkpoints", str(steps)))
  if stage.module == "rrcm_jax.finetune":
    return os.path.exists(os.path.join(stage.workdir, "test_results.json"))
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


def classifier_row(root, method, sigma, walls, budget):
  """One Markdown row: val / test accuracies per level, training FLOPs and wall time."""
  workdir = finetune_dir(root, method, sigma)
  metrics = workdir_lib.read_metrics(workdir)
  val = next((r for r in reversed(metrics) if "val/clean" in r), {})
  flops = next((r["total_flops"] for r in reversed(metrics) if "total_flops" in r), None)
  test_path = os.path.join(workdir, "test_results.json")
  test = {}
  if os.path.exists(test_path):
    with open(test_path) as f:
      test = json.load(f).get("last", {})
  cells = []
  for name in ("clean", "noisy_0.5", "noisy_1.0", "noisy_2.0"):
    v, t = val.get(f"val/{name}"), test.get(name)
    cells.append(f"{'–' if v is None else f'{v:.3f}'} / {'–' if t is None else f'{t:.3f}'}")
  train_wall = walls.get(f"{method}_sigma{sigma}", 0.0)
  if method == "rrcm":
    train_wall += walls.get("pretrain", 0.0)
  flops_cell = "pending" if flops is None else f"{flops / 1e12:,.2f} ({flops / budget:.3f})"
  return (f"| {method} | " + " | ".join(cells) + f" | {flops_cell} | {train_wall / 60:.1f} | "
          f"{walls.get(f'certify_{method}_sigma{sigma}', 0.0) / 60:.1f} |")


def sigma_section(root, sigma, methods, walls, budget, certify_cfg, val_split):
  """The Markdown of one σ: certified accuracies, the plot, the classifiers."""
  lines = [f"## σ = {sigma}", ""]
  done = [m for m in methods if os.path.exists(certify_log(root, m, sigma))]
  logs = [certlog.read_log(certify_log(root, m, sigma)) for m in done]
  if logs:
    lines += [report.markdown_table([LABELS[m] for m in done], logs, radii=RADII), ""]
    plot = os.path.join(root, f"certified_sigma{sigma}.png")
    report.plot_certified_accuracy(plot, [LABELS[m] for m in done], logs,
                                   title=f"Fashion-MNIST, σ = {sigma}, equal training FLOPs")
    report.write_csv(os.path.join(root, f"certified_sigma{sigma}.csv"),
                     [LABELS[m] for m in done], logs, radii=RADII)
    lines += [f"![certified accuracy, σ = {sigma}]({os.path.basename(plot)})", ""]
    per_image = certify_cfg.n0 + certify_cfg.n   # the first image also pays for compiling
    rates = [f"{m} {per_image / max(float(np.median(log['time'])), 1e-9):,.0f}"
             for m, log in zip(done, logs)]
    lines += [f"Noisy samples classified per second while certifying (median image): "
              f"{', '.join(rates)}.", ""]
  pending = [m for m in methods
             if not os.path.exists(certify_log(root, m, sigma)[:-len(".tsv")] + ".md")]
  if pending:
    lines += [f"Certification pending or incomplete: {', '.join(pending)}.", ""]
  lines += [f"Accuracies of the base classifiers, validation ({val_split}) / test, last "
            "checkpoint, at model-space noise s (s = 2σ: 0.5 is σ = 0.25, 1.0 is σ = 0.5); "
            "training TFLOP with the ratio to the budget; wall minutes (rRCM's training "
            "includes the whole shared pre-training).", "",
            "| method | clean | s = 0.5 | s = 1.0 | s = 2.0 | training TFLOP (/ budget) | "
            "training min | certify min |", "|" + "---|" * 8]
  lines += [classifier_row(root, m, sigma, walls, budget) for m in methods]
  return lines + [""]


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


def summary_scope(root, sigmas, methods):
  """The σ and methods asked for, plus those an earlier call trained in `root`."""
  trained = lambda m, s: os.path.isdir(finetune_dir(root, m, s))
  sigmas = sorted(set(sigmas) | {s for s in common.SIGMAS
                                 if any(trained(m, s) for m in rep.METHODS)})
  methods = [m for m in rep.METHODS if m in methods or any(trained(m, s) for s in sigmas)]
  return sigmas, methods


def write_summary(root, sigmas, methods, quick, data):
  """Rewrites <root>/summary.md (and the plots) from whatever is complete."""
  from rrcm_jax.flops import forward_flops  # pylint: disable=g-import-not-at-top
  records = read_records(root)
  sigmas, methods = summary_scope(root, sigmas, methods)
  walls = stage_walls(records)
  pre = rep.get_config(rep.config_arg("pretrain", quick=quick))
  certify_cfg = rep.get_config(rep.config_arg("certify", sigmas[0], quick))
  budget = budgets.budget_flops(quick)
  macs = forward_flops(pre.model, rep.NUM_CLASSES) / 2
  m = pre.model
  lines = [
      "# Replication on Fashion-MNIST: rRCM vs Gaussian augmentation vs consistency "
      "regularization at equal training FLOPs", "",
      f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by `python -m experiments.replication` "
      f"(configs/fashion_mnist_replication.py{', QUICK smoke-test sizes' if quick else ''}; "
      f"data {data}). Partial until every stage below is done.", "",
      f"- Model: ViT width {m.width}, depth {m.depth}, {m.num_heads} heads, patch "
      f"{m.patch_size} on {m.image_size}×{m.image_size}×{m.channels}: {macs / 1e6:.2f} M "
      "multiply-adds per classifier forward.",
      f"- Training budget per σ and method: {budget / 1e12:,.2f} TFLOP (forward 1, forward + "
      "backward 3; rRCM's pre-training counted in full at each σ).",
      f"- Certification: CERTIFY, n0 = {certify_cfg.n0}, n = {certify_cfg.n:,}, α = "
      f"{certify_cfg.alpha}, every {certify_cfg.every}-th image of "
      f"{certify_cfg.data.eval_split} (at most {certify_cfg.num_images}); radii are L2 in "
      "pixel space [0, 1]; abstentions count as wrong. Seed "
      f"{pre.seed} in every stage.", ""]
  for sigma in sigmas:
    lines += sigma_section(root, sigma, methods, walls, budget, certify_cfg,
                           rep.SIZES[quick].val_split)
  lines += stages_table(records, walls)
  with open(os.path.join(root, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def refresh_summary(root, args):
  """write_summary for the loop: a broken summary is reported, never stops the stages."""
  summarize_safely(lambda: write_summary(root, args.sigmas, args.methods, args.quick, args.data))


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
  parser.add_argument("--methods", default=",".join(rep.METHODS))
  parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
  parser.add_argument("--data", default="fashion_mnist", choices=("fashion_mnist", "synthetic"))
  args = parser.parse_args(argv)
  try:
    args.sigmas = [common.check_sigma(float(s)) for s in args.sigmas.split(",")]
  except ValueError:
    parser.error(f"--sigmas must be a comma-separated list of {common.SIGMAS}, "
                 f"got {args.sigmas!r}.")
  args.methods = args.methods.split(",")
  if not args.methods or set(args.methods) - set(rep.METHODS):
    parser.error(f"--methods must be a comma-separated list of {rep.METHODS}, got "
                 f"{','.join(args.methods)!r}.")
  return args


def main(argv=None):
  args = parse_args(argv)
  root = os.path.abspath(args.root)
  try:
    check_root(root, args.quick, args.data)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  overrides = [] if args.data == "fashion_mnist" else [f"--config.data.name={args.data}"]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  stages = plan(root, args.sigmas, args.methods, args.quick, args.data)

  def on_term(signum, frame):  # pylint: disable=unused-argument
    raise Interrupted("SIGTERM")
  signal.signal(signal.SIGTERM, on_term)
  start = time.time()
  try:
    for k, stage in enumerate(stages, start=1):
      if is_complete(stage, read_records(root)):
        print(f"=== {stage.name} ({k}/{len(stages)}) is complete: skipped", flush=True)
        append_record(root, stage=stage.name, status="skipped", workdir=stage.workdir)
        continue
      run_stage(root, stage, overrides if stage.arg else [], env, f"({k}/{len(stages)}) ")
      refresh_summary(root, args)
  except (Interrupted, KeyboardInterrupt, RuntimeError) as e:
    print(f"error: {e or 'interrupted'}", file=sys.stderr, flush=True)
    refresh_summary(root, args)
    return 1
  write_summary(root, args.sigmas, args.methods, args.quick, args.data)
  print(f"\nall {len(stages)} stages complete ({(time.time() - start) / 60:.1f} min in this "
        f"call); summary: {os.path.join(root, 'summary.md')}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
