r"""summary.md of the replication experiment (`python -m experiments.replication`).

Rewritten after every stage from whatever is complete in the root: the two choices
(rRCM's start, DDS's classifier share) with the validation numbers they were made on,
certified accuracy per σ and arm with one plot per σ (certified_sigma<σ>.png / .csv),
the classifiers' accuracies, training FLOPs under two accountings of the shared
trainings, the larger-budget points (done or pending, with their commands, and each beside
its 1× run: which way the gap moves), the inference cost of each certified arm
(`experiments.figure1`: its table and figure1.png), and every stage's command and wall time.
"""
import json
import os
import shlex
import time

import numpy as np

from configs import fashion_mnist_replication as rep
from experiments import budgets
from experiments import replication as driver
from rrcm_jax import certlog, flops, report
from rrcm_jax import workdir as workdir_lib

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
EARLIER = "rrcm"   # workdirs rrcm_sigma<σ>: the earlier run, EMA start of an earlier pre-training
EARLIER_LABEL = "rRCM, earlier run (EMA start, earlier pre-training)"
SHORT = {"rrcm": "rRCM", "consistency": "consistency regularization"}


def tflop(x):
  return "–" if x is None else f"{x / 1e12:,.2f}"


def cell(x, digits=3):
  return "–" if x is None else f"{x:.{digits}f}"


def test_last(workdir):
  """The last checkpoint's test accuracies of a fine-tuning workdir ({} before its end)."""
  path = os.path.join(workdir, "test_results.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f).get("last", {})


def last_record(workdir, key):
  metrics = workdir_lib.read_metrics(workdir) if os.path.isdir(workdir) else []
  return next((r for r in reversed(metrics) if key in r), {})


def done_log(path):
  """Whether a certification log is complete (the report beside it is written at its end)."""
  return os.path.exists(path[:-len(".tsv")] + ".md")


# ----------------------------------------------------------------------------
# The arms: (key, label, certification log, fine-tuning workdir or None).
# ----------------------------------------------------------------------------
def arms(root, sigma, init, scales):
  """Every arm certified (or to be) at `sigma`, in the tables' order."""
  out = []
  if init:
    out.append((driver.rrcm_name(init), f"rRCM ({init} start)",
                driver.certify_log(root, driver.rrcm_name(init), sigma),
                driver.finetune_dir(root, driver.rrcm_name(init), sigma)))
  out.append((EARLIER, EARLIER_LABEL, driver.certify_log(root, EARLIER, sigma),
              driver.finetune_dir(root, EARLIER, sigma)))
  for m in ("gaussian", "consistency"):
    out.append((m, driver.LABELS[m], driver.certify_log(root, m, sigma),
                driver.finetune_dir(root, m, sigma)))
  out.append(("dds", driver.LABELS["dds"] + ", every 4th image",
              driver.certify_log(root, "dds", sigma), None))
  for scale in scales:
    for m in driver.SCALED_METHODS:
      name = driver.rrcm_name(init) if m == "rrcm" else m
      if m == "rrcm" and not init:
        continue
      out.append((driver.scaled(name, scale), f"{SHORT[m]}, {scale}× budget",
                  driver.certify_log(root, name, sigma, scale),
                  driver.finetune_dir(root, name, sigma, scale)))
  return out


def certified_section(root, sigma, init, scales):
  """Certified accuracy table, plot and CSV of the arms with a log at `sigma`."""
  present = [(k, label, log) for k, label, log, _ in arms(root, sigma, init, scales)
             if os.path.exists(log)]
  if not present:
    return ["No certification at this σ yet.", ""]
  labels = [label + ("" if done_log(log) else " (partial)") for _, label, log in present]
  logs = [certlog.read_log(log) for _, _, log in present]
  plot = os.path.join(root, f"certified_sigma{sigma}.png")
  report.plot_certified_accuracy(plot, labels, logs,
                                 title=f"Fashion-MNIST, σ = {sigma}, equal training FLOPs")
  report.write_csv(os.path.join(root, f"certified_sigma{sigma}.csv"), labels, logs, radii=RADII)
  lines = [report.markdown_table(labels, logs, radii=RADII), "",
           f"![certified accuracy, σ = {sigma}]({os.path.basename(plot)})", ""]
  return lines + same_images_table(present, labels, logs)


def on_images(log, idx):
  """The rows of a read log whose test index is in `idx`."""
  keep = np.isin(log["idx"], idx)
  return {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in log.items()}


def same_images_table(present, labels, logs):
  """Every arm on DDS's images only (DDS certifies a subset): the like-for-like comparison."""
  dds = [i for i, (key, _, _) in enumerate(present) if key == "dds"]
  if not dds or len(logs[dds[0]]["idx"]) == 0:
    return []
  idx = logs[dds[0]]["idx"]
  subset = [on_images(log, idx) for log in logs]
  return [f"The same {len(idx)} images for every arm (those DDS certified), like for like:", "",
          report.markdown_table(labels, subset, radii=RADII), ""]


def classifier_section(root, sigma, init, scales, val_split):
  """The base classifiers' validation / test accuracies at each model-space level."""
  rows = [(label, wd) for _, label, _, wd in arms(root, sigma, init, scales) if wd]
  if sigma == rep.SIGMAS[0]:
    rows[1:1] = [(f"rRCM ({i} start)", driver.finetune_dir(root, driver.rrcm_name(i), sigma))
                 for i in rep.INITS if i != init]
  lines = [f"Base classifiers, validation ({val_split}) / test accuracy of the last checkpoint "
           "(the one certified) at model-space noise s (s = 2σ: 0.5 is σ = 0.25, 1.0 is "
           "σ = 0.5), training TFLOP of the run (rRCM: with its pre-training):", "",
           "| classifier | clean | s = 0.5 | s = 1.0 | s = 2.0 | TFLOP |", "|" + "---|" * 6]
  for label, wd in rows:
    if not os.path.isdir(wd):
      continue
    val, test = last_record(wd, "val/clean"), test_last(wd)
    if not test:
      label += (f" (in progress; last validated at step {val['step']})" if val else
                " (in progress)")
    cells = [f"{cell(val.get(f'val/{k}'))} / {cell(test.get(k))}"
             for k in ("clean", "noisy_0.5", "noisy_1.0", "noisy_2.0")]
    total = last_record(wd, "total_flops").get("total_flops")
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {tflop(total)} |")
  return lines + [""]


# ----------------------------------------------------------------------------
# The choices.
# ----------------------------------------------------------------------------
def init_section(root, sigma, inits=rep.INITS):
  init, values = driver.choose_init(root, sigma, inits)
  key = driver.init_key(sigma)
  lines = [f"## rRCM's start (chosen at σ = {sigma} on validation accuracy at s = {2 * sigma})",
           "", f"Fine-tuned from the pre-training in `pretrain/` (`init=`, config.init_weights) "
           f"with everything else equal; the start with the best {key} (last checkpoint) is "
           "used at every other σ and in every certification. Only the chosen run's "
           "FLOPs count toward rRCM's budget; the others are the selection's cost.", "",
           f"| start | val clean | {key} | test at s = {2 * sigma} |", "|---|---|---|---|"]
  for i in inits:
    wd = driver.finetune_dir(root, driver.rrcm_name(i), sigma)
    test = test_last(wd).get(f"noisy_{2 * float(sigma)}")
    mark = " (chosen)" if i == init else ""
    lines.append(f"| {i}{mark} | {cell(last_record(wd, 'val/clean').get('val/clean'))} | "
                 f"{cell(values.get(i))} | {cell(test)} |")
  lines += ["", f"Chosen: **{init}**." if init else "Chosen: pending (fine-tunings incomplete).",
            ""]
  return lines, init


def share_section(root, quick):
  share, values = driver.choose_share(root)
  lines = ["## DDS: the split of the budget between classifier and denoiser", "",
           "One denoiser and one clean classifier serve every σ, like rRCM's pre-training; "
           "together they get the per-σ budget. The clean classifier (the replication ViT, "
           "task clean) was trained at each share below; the denoiser gets the rest. The "
           f"chosen share is the smallest whose validation clean accuracy is within "
           f"{driver.SATURATION} of the best: beyond it the classifier's accuracy has "
           "saturated, so further FLOPs go to the denoiser, whose quality sets what the "
           f"classifier sees. Denoiser: U-Net preset {rep.DENOISER_PRESET} "
           f"({budgets.denoiser_step_flops(quick) / rep.SIZES[quick].denoiser_batch / 3e9:.3f} "
           f"GFLOP per forward), batch {rep.SIZES[quick].denoiser_batch}. The unchosen "
           "classifiers are the selection's cost, not counted.", "",
           "| classifier share | classifier steps | classifier TFLOP | val clean | test clean "
           "| denoiser steps | denoiser TFLOP |", "|---|---|---|---|---|---|---|"]
  for sh in rep.CLEAN_SHARES:
    steps, dsteps = rep.DDS_STEPS[quick][sh]
    cflops, dflops = budgets.dds_flops(sh, quick)
    mark = " (chosen)" if sh == share else ""
    test = test_last(driver.clean_dir(root, sh)).get("clean")
    lines.append(f"| {sh}{mark} | {steps:,} | {tflop(cflops)} | {cell(values.get(sh))} | "
                 f"{cell(test)} | {dsteps:,} | {tflop(dflops)} |")
  if share is not None:
    logged = last_record(driver.denoiser_dir(root, share), "train_flops").get("train_flops")
    lines += ["", f"Chosen: **{share}** of the budget for the classifier, {1 - share} for the "
              f"denoiser (its run logged {tflop(logged)} TFLOP)."]
    if share == max(rep.CLEAN_SHARES):
      lines[-1] += (" It is the largest share tried and the classifier's accuracy was still "
                    "rising there: the split is at the edge of the search, not at a "
                    "measured optimum.")
  else:
    lines += ["", "Chosen: pending (classifiers incomplete)."]
  return lines + [""], share


# ----------------------------------------------------------------------------
# Two accountings of the shared trainings.
# ----------------------------------------------------------------------------
def baseline_at(workdir, key, budget):
  """(val accuracy `key`, TFLOP) at the last validation whose training FLOPs <= budget."""
  best = (None, None)
  step_flops = {}
  for r in workdir_lib.read_metrics(workdir) if os.path.isdir(workdir) else []:
    if "train_flops" in r:
      step_flops[r["step"]] = r["train_flops"]
    if key in r and step_flops.get(r["step"], float("inf")) <= budget:
      best = (r[key], step_flops[r["step"]])
  return best


def accounting_section(root, sigmas, init, share, quick):
  budget = budgets.budget_flops(quick)
  served = len(sigmas)
  pre = budgets.pretrain_flops(quick)
  rrcm_own = budgets.method_flops("rrcm", quick) - pre
  dds_shared = None if share is None else sum(budgets.dds_flops(share, quick))
  lines = ["## Training FLOPs under two accountings", "",
           "(a) full: a shared training (rRCM's pre-training; DDS's denoiser and clean "
           "classifier) is charged in full at each σ, as the budget was set. (b) once: it is "
           f"charged once, split over the {served} σ it serves. The same runs under both; "
           "nothing was retrained for (b). Certified accuracy at r = 0.25 / 0.5 and ACR.", "",
           "| arm | σ | (a) TFLOP | (a) / budget | (b) TFLOP | (b) / budget | r = 0.25 | "
           "r = 0.5 | ACR |", "|" + "---|" * 9]
  rows = [("rRCM" + (f" ({init} start)" if init else ""), driver.rrcm_name(init) if init else None,
           rrcm_own, pre), (EARLIER_LABEL, EARLIER, rrcm_own, pre),
          ("Gaussian", "gaussian", budgets.method_flops("gaussian", quick), 0.0),
          ("consistency", "consistency", budgets.method_flops("consistency", quick), 0.0),
          ("DDS", "dds", 0.0, dds_shared)]
  for sigma in sigmas:
    for label, key, own, shared in rows:
      if key is None or shared is None or not (
          os.path.isdir(driver.finetune_dir(root, key, sigma)) or
          os.path.isdir(driver.certify_dir(root, key, sigma))):
        continue
      charged = budgets.per_sigma_flops(own, shared, served)
      log = driver.certify_log(root, key, sigma)
      acc = ["–"] * 3
      if done_log(log):
        a, r = report.summarize([certlog.read_log(log)], (0.25, 0.5))
        acc = [f"{a[0][0]:.3f}", f"{a[0][1]:.3f}", f"{r[0]:.3f}"]
      lines.append(f"| {label} | {sigma} | {tflop(charged['full'])} | "
                   f"{charged['full'] / budget:.3f} | {tflop(charged['once'])} | "
                   f"{charged['once'] / budget:.3f} | " + " | ".join(acc) + " |")
  once = budgets.per_sigma_flops(rrcm_own, pre, served)["once"]
  lines += ["", f"Under (b) rRCM used {once / budget:.3f} of the baselines' per-σ budget"
            + ("" if dds_shared is None else
               f" and DDS {budgets.per_sigma_flops(0.0, dds_shared, served)['once'] / budget:.3f}")
            + ". The baselines were not rerun at that smaller budget. What they had reached "
            f"after {tflop(once)} TFLOP inside their own runs (validation accuracy at s = 2σ, "
            "the last epoch within it; a mid-run point of a longer cosine schedule, so below "
            "what a run sized to it would reach):"]
  for sigma in sigmas:
    for m in ("gaussian", "consistency"):
      if os.path.isdir(driver.finetune_dir(root, m, sigma)):
        acc, at = baseline_at(driver.finetune_dir(root, m, sigma), driver.init_key(sigma), once)
        lines.append(f"- {m}, σ = {sigma}: {cell(acc)} (after {tflop(at)} TFLOP)")
  return lines + [""]


# ----------------------------------------------------------------------------
# Larger budgets, cost, stages.
# ----------------------------------------------------------------------------
def gap_section(root, sigma, init, scales):
  """Each larger-budget arm beside its 1× run on the same images, and the baseline's lead
  over rRCM at each multiple where both are certified: which way the gap moves."""
  done = {}
  for m in driver.SCALED_METHODS:
    if m == "rrcm" and not init:
      continue
    name = driver.rrcm_name(init) if m == "rrcm" else m
    for scale in (1, *scales):
      log = driver.certify_log(root, name, sigma, scale)
      if os.path.exists(log) and done_log(log):
        done[m, scale] = certlog.read_log(log)
  if not any(scale > 1 for _, scale in done):
    return []
  radii = (0.5, 1.0)
  lines = ["Which way the gap moves (complete certifications only, "
           f"σ = {sigma}):", "",
           "| arm | budget | images | " + " | ".join(f"r = {r:g}" for r in radii) + " | ACR |",
           "|" + "---|" * (4 + len(radii))]
  for (m, scale), log in done.items():
    accuracies, acrs = report.summarize([log], radii)
    lines.append(f"| {SHORT[m]} | {scale}× | "
                 f"{len(log['idx'])} | " + " | ".join(cell(a) for a in accuracies[0]) +
                 f" | {cell(acrs[0])} |")
  lines.append("")
  for scale in (1, *scales):
    if ("rrcm", scale) in done and ("consistency", scale) in done:
      (acc_r, acc_c), (acr_r, acr_c) = report.summarize(
          [done["rrcm", scale], done["consistency", scale]], radii)
      lead = ", ".join(f"{c - r:+.3f} at r = {x:g}" for x, r, c in zip(radii, acc_r, acc_c))
      lines.append(f"- {scale}×: consistency regularization minus rRCM: {acr_c - acr_r:+.3f} ACR; "
                   f"certified accuracy {lead}.")
  for scale in scales:
    missing = [m for m in ("rrcm", "consistency") if (m, scale) not in done]
    if missing:
      lines.append(f"- {scale}×: not certified yet: {' and '.join(SHORT[m] for m in missing)} "
                   f"(the driver resumes {'it' if len(missing) == 1 else 'them'}).")
  return lines + [""]


def scales_section(root, args, init=None):
  if not args.budget_scales:
    return []
  stages = {s.name: s for s in driver.current_plan(root, args)}
  lines = ["## Larger budgets (σ = %s)" % args.sigmas[-1], "",
           "rRCM with its pre-training and fine-tuning both × the multiple, consistency "
           "regularization with × the steps: equal FLOPs again. Planned after everything at "
           "1×; the same driver command resumes them.", "",
           "| stage | TFLOP | status | command |", "|---|---|---|---|"]
  for scale in args.budget_scales:
    for name, s in stages.items():
      if f"x{scale}" not in name:
        continue
      status = ("done" if driver.is_complete(s, []) else
                "started (resumes)" if os.path.isdir(s.workdir) else "pending")
      if name.startswith("certify"):
        cost = ""
      elif name.startswith("pretrain"):
        cost = tflop(scale * budgets.pretrain_flops(args.quick))
      else:
        cost = tflop(budgets.scaled_flops("rrcm" if "rrcm" in name else "consistency", scale,
                                          args.quick)) + (" (with pre-training)"
                                                          if "rrcm" in name else "")
      command = shlex.join(["python", *s.argv()[1:]]).replace(driver.REPO + os.sep, "")
      lines.append(f"| {name} | {cost} | {status} | `{command}` |")
  return lines + [""] + gap_section(root, args.sigmas[-1], init, args.budget_scales)


# The experiment that would test the claim: the paper's pre-training length on a GPU.
LONG_STEPS, LONG_BATCH = 30_000, 2_048
LONG_WORKDIR = "pretrain_long"


def long_section(root, quick):
  """What the paper's regime (thousands of pre-training epochs) costs here and the commands
  that run it on a GPU; its k-NN curve once `<root>/pretrain_long` holds the run."""
  pre = rep.pretrain_config(quick)
  train = budgets.DEMO_TRAIN_EXAMPLES
  per_image = budgets.pretrain_flops(quick) / (pre.total_steps * pre.batch_size)
  images = LONG_STEPS * LONG_BATCH
  wall = pretrain_walls(root, driver.read_records(root))[0]
  total = images * per_image
  on_cpu = (f"{total / (budgets.pretrain_flops(quick) / wall) / 86_400:.1f} days at the rate "
            f"the pre-training above ran on this CPU "
            f"({budgets.pretrain_flops(quick) / wall / 1e9:.1f} GFLOP/s)") if wall else "days here"
  at = os.path.join(os.path.relpath(root, driver.REPO), LONG_WORKDIR)
  knn_every = LONG_STEPS // 8
  commands = [
      f"python -m rrcm_jax.pretrain --config=configs/fashion_mnist_replication.py:stage=pretrain "
      f"--workdir={at} --config.data.pipeline=device --config.batch_size={LONG_BATCH} "
      f"--config.total_steps={LONG_STEPS} --config.knn_every={knn_every} "
      f"--config.latest_every=1000"]
  for sigma in rep.SIGMAS:
    commands.append(
        f"python -m rrcm_jax.finetune --config=configs/fashion_mnist_replication.py:"
        f"stage=rrcm,sigma={sigma},init=online --workdir={at}_rrcm_sigma{sigma} "
        f"--config.init_from={at}")
    commands.append(
        f"python -m rrcm_jax.certify --config=configs/fashion_mnist_replication.py:"
        f"stage=certify,sigma={sigma} --workdir={at}_certify_sigma{sigma} "
        f"--config.init_from={at}_rrcm_sigma{sigma}")
  lines = [
      "## The experiment that would test the claim: the paper's pre-training length", "",
      f"The paper pre-trains for ≈ 12,000 epochs; the pre-training above is "
      f"{pre.total_steps * pre.batch_size / train:.1f} epochs of {train:,} images. One "
      f"pre-training image costs {per_image / 1e9:.2f} GFLOP here, so {LONG_STEPS:,} steps of "
      f"{LONG_BATCH:,} ({images / train:,.0f} epochs) are {total / 1e15:.1f} PFLOP: "
      f"{on_cpu}, minutes on one GPU. The "
      "schedules' horizon follows `total_steps` (warm-up, target EMA, scales); then the "
      "same fine-tuning and certification as the rRCM arm:", "",
      "```", *commands, "```", ""]
  long_dir = os.path.join(root, LONG_WORKDIR)
  rows = [r for r in (workdir_lib.read_metrics(long_dir) if os.path.isdir(long_dir) else [])
          if "knn/online/clean" in r]
  if not rows:
    return lines + [f"Not run yet: `{at}` holds no k-NN evaluation.", ""]
  lines += ["k-NN accuracy of the long pre-training (online / EMA; clean, s = 0.5, s = 1.0):", "",
            "| step | online | EMA |", "|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['step']:,} | " + " | ".join(
        " / ".join(cell(r.get(f"knn/{w}/{lvl}"), 3) for lvl in ("clean", "noisy_0.5", "noisy_1.0"))
        for w in ("online", "ema")) + " |")
  return lines + [""]


def inference_flops(log):
  """FLOPs per noisy sample of a log that did not record them: the ViT's forward, plus the
  U-Net's for DDS (`rrcm_jax.flops`, `budgets.denoiser_step_flops`)."""
  settings = report.log_settings(log) or {}
  if settings.get("inference_flops_per_sample"):
    return None
  vit = flops.forward_flops(rep.model_config(), rep.NUM_CLASSES)
  if settings.get("method") == "dds":   # one U-Net forward per noisy sample (one-step denoising)
    vit += budgets.denoiser_step_flops() / rep.SIZES[False].denoiser_batch / 3
  return vit


def cost_section(root, sigmas, init, scales):
  from experiments import figure1  # pylint: disable=g-import-not-at-top
  lines = ["## Inference cost (Figure 1)", "",
           "Per certified arm: FLOPs per noisy sample, the measured rate while certifying "
           "(median image, this CPU), and the seconds one image would cost at n = 100,000, "
           "n0 = 100. The logs' rates were measured at different loads of a shared machine; "
           "`python -m benchmarks.inference_cost --datasets fashion_mnist_replication` times "
           "rRCM's and DDS's per-sample functions in one run (benchmarks/README.md, \"Inference "
           "cost: rRCM vs DDS\").", ""]
  points = []
  for sigma in sigmas:
    here = []
    for _, label, log, _ in arms(root, sigma, init, scales):
      if done_log(log):
        here.append(figure1.load_point(log, f"{label} σ={sigma:g}", inference_flops(log)))
    if here:
      lines += [f"σ = {sigma}:", "", figure1.markdown_table(here), ""]
    points += here
  if points:
    figure1.draw(points, os.path.join(root, "figure1.png"))
    lines += ["![certified accuracy against inference cost](figure1.png)", ""]
  return lines


def seconds(stamp):
  return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))


def current_pretrain_since(root, records):
  """When the current pre-training started (seconds since the epoch, None without one): the
  driver's start record just before its first run (<root>/pretrain/runs.jsonl), else that run;
  earlier "pretrain" records belong to the earlier pre-training."""
  path = os.path.join(driver.pretrain_dir(root), "runs.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    first = seconds(json.loads(f.readline())["time"])
  starts = [seconds(r["time"]) for r in records if r["stage"] == "pretrain"
            and r["status"] == "started" and first - 120 <= seconds(r["time"]) <= first]
  return min(starts, default=first)


def label_earlier(records, root):
  """The records with the earlier pre-training's stage renamed "pretrain (earlier)"."""
  since = current_pretrain_since(root, records)
  return [dict(r, stage="pretrain (earlier)") if r["stage"] == "pretrain" and since
          and seconds(r["time"]) < since else r for r in records]


def pretrain_walls(root, records):
  """(seconds of the current pre-training, of the earlier one): the driver's records of each,
  or for a current one run outside the driver its own span (first run to final checkpoint)."""
  since = current_pretrain_since(root, records)
  ours = [r for r in label_earlier(records, root) if "wall_s" in r]
  now = sum(r["wall_s"] for r in ours if r["stage"] == "pretrain")
  earlier = sum(r["wall_s"] for r in ours if r["stage"] == "pretrain (earlier)")
  if not now and since:
    steps = rep.pretrain_config(False).total_steps
    final = os.path.join(driver.pretrain_dir(root), "checkpoints", str(steps))
    if os.path.isdir(final):
      now = os.path.getmtime(final) - since
  return now, earlier


def write_summary(root, args):
  """Rewrites <root>/summary.md (and the plots) from whatever is complete."""
  records = driver.read_records(root)
  quick = args.quick
  pre = rep.get_config(rep.config_arg("pretrain", quick=quick))
  certify_cfg = rep.get_config(rep.config_arg("certify", args.sigmas[0], quick))
  dds_cfg = rep.get_config(rep.config_arg("dds_certify", args.sigmas[0], quick))
  budget = budgets.budget_flops(quick)
  m = pre.model
  now, earlier = pretrain_walls(root, records)
  lines = [
      "# Replication on Fashion-MNIST: rRCM vs Gaussian augmentation vs consistency "
      "regularization vs DDS at equal training FLOPs", "",
      f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by `python -m experiments.replication` "
      f"(configs/fashion_mnist_replication.py{', QUICK smoke-test sizes' if quick else ''}; "
      f"data {args.data}). Partial until every stage below is done.", "",
      f"- Model: ViT width {m.width}, depth {m.depth}, {m.num_heads} heads, patch "
      f"{m.patch_size} on {m.image_size}×{m.image_size}×{m.channels}: "
      f"{flops.forward_flops(m, rep.NUM_CLASSES) / 2e6:.2f} M multiply-adds per classifier "
      "forward.",
      f"- Training budget per σ and arm: {budget / 1e12:,.2f} TFLOP (forward 1, forward + "
      "backward 3); shared trainings counted in full at each σ (accounting (b) below "
      "counts them once).",
      f"- Certification: CERTIFY, n0 = {certify_cfg.n0}, n = {certify_cfg.n:,}, α = "
      f"{certify_cfg.alpha}, every {certify_cfg.every}th image of "
      f"{certify_cfg.data.eval_split} (at most {certify_cfg.num_images}); DDS on every "
      f"{dds_cfg.every}th ({dds_cfg.num_images} images: every 4th of those, its U-Net being "
      "slow on this CPU). Radii are L2 in pixel space [0, 1]; abstentions count as wrong. "
      f"Seed {pre.seed} in every stage.",
      f"- Wall time of the pre-training: {now / 60:.1f} min" +
      (f" (the earlier one: {earlier / 60:.1f} min)." if earlier else "."), ""]
  init = share = None
  if "rrcm" in args.methods:
    part, init = init_section(root, args.sigmas[0], driver.starts(args))
    lines += part
  if "dds" in args.methods:
    part, share = share_section(root, quick)
    lines += part
  for sigma in args.sigmas:
    scales = args.budget_scales if sigma == args.sigmas[-1] else ()
    lines += [f"## σ = {sigma}", ""] + certified_section(root, sigma, init, scales)
    lines += classifier_section(root, sigma, init, scales, rep.SIZES[quick].val_split)
  lines += accounting_section(root, args.sigmas, init, share, quick)
  lines += scales_section(root, args, init)
  lines += cost_section(root, args.sigmas, init, args.budget_scales)
  lines += long_section(root, quick)
  records = label_earlier(records, root)
  lines += driver.stages_table(records, driver.stage_walls(records))
  with open(os.path.join(root, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
