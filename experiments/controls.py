r"""Controlled runs of the replication's rRCM arm: which knob closes the gap to the baselines?

  nohup python -m experiments.controls --root results/replication_controls \
      --replication results/replication > results/replication_controls/log.txt 2>&1 &

Each control changes one thing of the replication's rRCM arm at σ = 0.25
(configs/fashion_mnist_replication.py, `pretrain` then `rrcm:0.25`) and is
measured by its fine-tuned classifier's accuracy on the whole Fashion-MNIST
test split, clean and at model-space noise s = 0.5 (σ = 0.25) and 1.0, next to
the replication's three classifiers at σ = 0.25 (`--replication`: read, never
written). With --certify each control is also certified like the replication
(CERTIFY, n0 = 100, n = 10,000, α = 0.001, every 50th test image).

Controls (`--controls`, comma-separated, in the order given):
  no_pretrain     the same fine-tuning from random initialization: what the
                  pre-training contributes at all
  finetune_10ep   the replication's pre-training, fine-tuned 10 epochs instead of
                  2 (about the consistency baseline's 9.8; warm-up 1 epoch, still 10 %):
                  the pre-trained initialization at a baseline-sized fine-tuning
  pretrain_4x     4x the pre-training steps (3,200 x 256 images; 4x its FLOPs)
  weak_crops      pre-training views cropped to 35-100 % of the image area instead of
                  8-100 % (`data.pretrain_crop_scale`): the augmentation strength
  scales_11       N = 11 noise levels during the whole pre-training instead of
                  the icm curriculum 21 -> 41 -> 81 (`scales.start/end`)
  width_192       width 192 instead of 128 (pre-training and fine-tuning; 2.2x FLOPs)

Every control is its own workdirs under --root (<control>_pretrain,
<control>_finetune, <control>_certify), run by the same CLIs as the
replication, recorded in <root>/stages.jsonl and resumed by running the same
command again; <root>/summary.md is rewritten after every stage.
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import time

from configs import fashion_mnist_replication as rep
from experiments import budgets, replication
from rrcm_jax import certlog, report
from rrcm_jax import workdir as workdir_lib

SIGMA = 0.25


@dataclasses.dataclass(frozen=True)
class Control:
  """One change to the rRCM arm. pretrain: overrides of a new pre-training, [] to reuse
  the replication's, None for none (random initialization)."""
  what: str
  pretrain: tuple = ()
  finetune: tuple = ()
  pretrain_multiple: int = 1      # pre-training steps: this times the replication's


CONTROLS = {
    "no_pretrain": Control("no pre-training: the same 2-epoch fine-tuning from random "
                           "initialization", pretrain=None),
    "finetune_10ep": Control("the replication's pre-training, 10 fine-tuning epochs instead of 2",
                             finetune=("--config.epochs=10", "--config.optim.warmup_epochs=1.0")),
    "pretrain_4x": Control("4x the pre-training steps (3,200)", pretrain_multiple=4),
    "weak_crops": Control("pre-training crops of 35-100 % of the image area instead of 8-100 %",
                          pretrain=("--config.data.pretrain_crop_scale=(0.35,1.0)",)),
    "scales_11": Control("N = 11 noise levels throughout the pre-training instead of 21 -> 81",
                         pretrain=("--config.scales.start=10", "--config.scales.end=10")),
    "width_192": Control("width 192 instead of 128 (2.2x FLOPs per forward)",
                         pretrain=("--config.model.width=192",),
                         finetune=("--config.model.width=192",)),
}


def reuses_pretrain(control):
  return control.pretrain == () and control.pretrain_multiple == 1


def stages(root, replication_root, name, certify, quick=False, data_overrides=()):
  """[(Stage, overrides, pre-training steps or None)] of one control, in order."""
  control, data_overrides = CONTROLS[name], list(data_overrides)
  out = []
  if control.pretrain is None:
    init_from = None
  elif reuses_pretrain(control):
    init_from = os.path.join(replication_root, "pretrain")
  else:
    init_from = os.path.join(root, f"{name}_pretrain")
    steps = control.pretrain_multiple * rep.SIZES[quick].pretrain_steps
    overrides = list(control.pretrain)
    if control.pretrain_multiple != 1:
      overrides.append(f"--config.total_steps={steps}")
    out.append((replication.Stage(f"{name}_pretrain", "rrcm_jax.pretrain",
                                  rep.config_arg("pretrain", quick=quick), init_from),
                data_overrides + overrides, steps))
  finetune_dir = os.path.join(root, f"{name}_finetune")
  out.append((replication.Stage(f"{name}_finetune", "rrcm_jax.finetune",
                                rep.config_arg("rrcm", SIGMA, quick), finetune_dir, init_from),
              data_overrides + list(control.finetune), None))
  if certify:
    model = [o for o in control.finetune if o.startswith("--config.model.")]
    out.append((replication.Stage(f"{name}_certify", "rrcm_jax.certify",
                                  rep.config_arg("certify", SIGMA, quick),
                                  os.path.join(root, f"{name}_certify"),
                                  finetune_dir), data_overrides + model, None))
  return out


def is_complete(stage, steps):
  if stage.module == "rrcm_jax.pretrain":
    return os.path.isdir(os.path.join(stage.workdir, "checkpoints", str(steps)))
  return replication.is_complete(stage, [])


# ----------------------------------------------------------------------------
# The summary.
# ----------------------------------------------------------------------------
def classifier_cells(workdir):
  """(test clean, s = 0.5, s = 1.0 cells, TFLOP or None) of a fine-tuning workdir."""
  test = {}
  path = os.path.join(workdir, "test_results.json")
  if os.path.exists(path):
    with open(path) as f:
      test = json.load(f).get("last", {})
  cells = [("–" if test.get(k) is None else f"{100 * test[k]:.1f}")
           for k in ("clean", "noisy_0.5", "noisy_1.0")]
  metrics = workdir_lib.read_metrics(workdir) if os.path.isdir(workdir) else []
  flops = next((r["total_flops"] for r in reversed(metrics) if "total_flops" in r), None)
  return cells, flops


def certified_cells(log_path):
  if not os.path.exists(log_path[:-len(".tsv")] + ".md"):
    return ["–"] * 4
  accuracies, acrs = report.summarize([certlog.read_log(log_path)], (0.0, 0.25, 0.5))
  return [f"{100 * a:.1f}" for a in accuracies[0]] + [f"{acrs[0]:.3f}"]


def write_summary(root, replication_root, names, certify, quick=False):
  records = replication.read_records(root)
  walls = replication.stage_walls(records)
  budget = budgets.budget_flops(quick)
  log_name = f"certify_sigma{float(SIGMA)}.tsv"
  lines = [
      "# Controlled runs of the rRCM arm (Fashion-MNIST, σ = 0.25)", "",
      f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by `python -m experiments.controls`. "
      "Each control changes one thing of the replication's rRCM arm "
      "(configs/fashion_mnist_replication.py); the first rows are the replication's own "
      f"classifiers at σ = {SIGMA} ({os.path.relpath(replication_root, replication.REPO)}). "
      "Test accuracy (%) of the last "
      "checkpoint on the whole test split, clean and at model-space noise s (s = 0.5 is "
      "σ = 0.25); training TFLOP with the ratio to the replication's per-σ budget "
      f"({budget / 1e12:.2f} TFLOP, the controls' include the pre-training they start "
      "from); wall minutes of the run's own training stages (a control that reuses the "
      "replication's pre-training does not count it; the replication's rRCM row does).", ""]
  header = "| run | what changes | clean | s = 0.5 | s = 1.0 | training TFLOP (/ budget) | min |"
  if certify:
    header += " cert. r=0 | r=0.25 | r=0.5 | ACR |"
  lines += [header, "|" + "---|" * (header.count("|") - 1)]

  def row(label, what, workdir, wall, log_path):
    cells, flops = classifier_cells(workdir)
    flops_cell = "–" if flops is None else f"{flops / 1e12:.2f} ({flops / budget:.2f})"
    line = f"| {label} | {what} | " + " | ".join(cells) + f" | {flops_cell} | {wall / 60:.1f} |"
    if certify:
      line += " " + " | ".join(certified_cells(log_path)) + " |"
    return line

  rep_walls = replication.stage_walls(replication.read_records(replication_root))
  for method in rep.METHODS:
    wall = rep_walls.get(f"{method}_sigma{SIGMA}", 0.0)
    wall += rep_walls.get("pretrain", 0.0) if method == "rrcm" else 0.0
    lines.append(row(f"replication: {method}", replication.LABELS[method],
                     replication.finetune_dir(replication_root, method, SIGMA), wall,
                     os.path.join(replication.certify_dir(replication_root, method, SIGMA),
                                  log_name)))
  for name in names:
    wall = walls.get(f"{name}_pretrain", 0.0) + walls.get(f"{name}_finetune", 0.0)
    lines.append(row(name, CONTROLS[name].what, os.path.join(root, f"{name}_finetune"), wall,
                     os.path.join(root, f"{name}_certify", log_name)))
  lines += [""] + replication.stages_table(records, walls)
  with open(os.path.join(root, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------
def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m experiments.controls",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, help="directory of the controls' workdirs")
  parser.add_argument("--replication", default="results/replication",
                      help="the replication's root (its pre-training and classifiers are read)")
  parser.add_argument("--controls", default=",".join(CONTROLS))
  parser.add_argument("--certify", action="store_true", help="also certify every control")
  parser.add_argument("--quick", action="store_true",
                      help="smoke-test sizes (with a --replication root run with --quick)")
  parser.add_argument("--data", default="fashion_mnist", choices=("fashion_mnist", "synthetic"))
  args = parser.parse_args(argv)
  args.controls = args.controls.split(",")
  unknown = [c for c in args.controls if c not in CONTROLS]
  if unknown:
    parser.error(f"--controls must be a comma-separated list of {', '.join(CONTROLS)}; "
                 f"unknown: {', '.join(unknown)}.")
  return args


def main(argv=None):
  args = parse_args(argv)
  root, replication_root = os.path.abspath(args.root), os.path.abspath(args.replication)
  try:
    replication.check_root(root, args.quick, args.data)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  data = [] if args.data == "fashion_mnist" else [f"--config.data.name={args.data}"]
  plan = [s for name in args.controls
          for s in stages(root, replication_root, name, args.certify, args.quick, data)]
  needs_pretrain = any(reuses_pretrain(CONTROLS[n]) for n in args.controls)
  shared = os.path.join(replication_root, "pretrain", "checkpoints",
                        str(rep.SIZES[args.quick].pretrain_steps))
  if needs_pretrain and not os.path.isdir(shared):
    print(f"error: --replication {args.replication} has no complete pre-training ({shared}); "
          "run experiments.replication first or leave out the controls that reuse it.",
          file=sys.stderr)
    return 2

  def on_term(signum, frame):  # pylint: disable=unused-argument
    raise replication.Interrupted("SIGTERM")
  signal.signal(signal.SIGTERM, on_term)
  summarize = lambda: replication.summarize_safely(
      lambda: write_summary(root, replication_root, args.controls, args.certify, args.quick))
  try:
    for k, (stage, overrides, steps) in enumerate(plan, start=1):
      if is_complete(stage, steps):
        print(f"=== {stage.name} ({k}/{len(plan)}) is complete: skipped", flush=True)
        replication.append_record(root, stage=stage.name, status="skipped",
                                  workdir=stage.workdir)
        continue
      replication.run_stage(root, stage, overrides, env, f"({k}/{len(plan)}) ",
                            complete=lambda s=stage, n=steps: is_complete(s, n))
      summarize()
  except (replication.Interrupted, KeyboardInterrupt, RuntimeError) as e:
    print(f"error: {e or 'interrupted'}", file=sys.stderr, flush=True)
    summarize()
    return 1
  summarize()
  print(f"\nall {len(plan)} control stages complete; summary: {root}/summary.md", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
