"""Certified accuracy and average certified radius from certification logs.

    python -m rrcm_jax.report LOG [LOG ...] [--radii 0,0.25,0.5] [--labels a,b]
        [--csv out.csv] [--latex out.tex] [--plot out.png] [--alpha 0.01] [--rho 0.001]
        [--reference cohen_log.tsv]

prints a Markdown table: per log, the certified accuracy at each radius r
(fraction of the logged images that are correct with radius >= r;
abstentions count as wrong) and the ACR (mean of radius * correct). With
several logs (e.g. one per sigma) the best value per radius is bold and a
"best" row gives the envelope, as the papers' tables mark it. `--plot` draws
certified accuracy against radius for all logs in one figure (PNG and PDF).
Radii are L2 norms in pixel space [0, 1]. PREDICT logs have no radius: their
images count as radius 0 (accuracy of the smoothed classifier at r = 0).

`--alpha` recomputes every row from the class counts kept beside the log
(`<log stem>.counts.jsonl`, `certlog.counts_path`) at another failure
probability, without sampling again (sigma from the log's settings, or
`--sigma`). `--rho` adds Cohen et al.'s high-probability certified accuracy
(their analyze.py, `HighProbAccuracy`): the approximate accuracy minus
alpha + sqrt(alpha (1 - alpha) ln(1/rho) / m) + ln(1/rho) / (3 m) over m
images, a lower bound that holds with probability >= 1 - rho over the
certification's noise. `--reference` warns in one line when a log's labels
differ from a reference log's at shared indices (other images than theirs).
Every file is read and written through `etils.epath` (local or gs://).
"""
import argparse
import csv
import io
import json
import math
import os
import sys

import numpy as np
from etils import epath

from rrcm_jax import certlog, smoothing

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5)
BEST_LABEL = "best"


def certified_accuracy(radius, correct, r):
  """Fraction of images with correct & radius >= r; r a scalar or an array [R]."""
  radius = np.asarray(radius, np.float64)
  correct = np.asarray(correct, bool)
  r = np.asarray(r, np.float64)
  if radius.size == 0:
    return np.zeros(r.shape)
  hits = correct[:, None] & (radius[:, None] >= r.reshape(-1)[None, :])
  return hits.mean(axis=0).reshape(r.shape)


def acr(radius, correct):
  """Average certified radius: mean of radius * correct (abstentions give 0)."""
  radius = np.asarray(radius, np.float64)
  return float(np.mean(radius * np.asarray(correct, bool))) if radius.size else 0.0


def log_radius(log):
  """The radii of a `certlog.read_log` dict (zeros for a PREDICT log)."""
  return log["radius"] if "radius" in log else np.zeros(log["idx"].shape)


def check_finite_radii(labels, logs):
  """ValueError (one sentence) at the first log with a radius that is not a finite number."""
  for label, log in zip(labels, logs):
    radius = log_radius(log)
    bad = ~np.isfinite(radius)
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(f"{label}: image {int(log['idx'][i])} has radius {float(radius[i])}, but a "
                       "certified radius is a finite number; the log is damaged or the run that "
                       "wrote it failed, so it is not reported.")


def summarize(logs, radii):
  """Certified accuracies [L, R] and ACRs [L] of L logs (`certlog.read_log` dicts)."""
  accuracies = np.stack([certified_accuracy(log_radius(log), log["correct"], radii) for log in logs])
  acrs = np.array([acr(log_radius(log), log["correct"]) for log in logs])
  return accuracies, acrs


def best_mask(values):
  """bool [L, R]: entries equal to their column's maximum (> 0), for L > 1 rows."""
  values = np.asarray(values)
  if values.shape[0] < 2:
    return np.zeros(values.shape, bool)
  top = values.max(axis=0, keepdims=True)
  return (values == top) & (top > 0)


def table_rows(labels, logs, radii, digits=3):
  """Header and rows of the report: label, images, accuracy per radius, ACR.

  With several logs the best value per column is wrapped in ** ** and a
  "best" row (the envelope, and the best ACR) is appended.
  """
  check_finite_radii(labels, logs)
  accuracies, acrs = summarize(logs, radii)
  values = np.concatenate([accuracies, acrs[:, None]], axis=1)
  marks = best_mask(values)
  head = ["log", "images"] + [f"r = {r:g}" for r in radii] + ["ACR"]
  rows = []
  for label, log, row, mark in zip(labels, logs, values, marks):
    cells = [f"**{v:.{digits}f}**" if m else f"{v:.{digits}f}" for v, m in zip(row, mark)]
    rows.append([label, str(len(log["idx"]))] + cells)
  if len(logs) > 1:
    rows.append([BEST_LABEL, ""] + [f"{v:.{digits}f}" for v in values.max(axis=0)])
  return head, rows


def markdown_table(labels, logs, radii=DEFAULT_RADII, digits=3):
  """The report as a Markdown table (str)."""
  head, rows = table_rows(labels, logs, radii, digits)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def write_csv(path, labels, logs, radii=DEFAULT_RADII, digits=4):
  """The report as CSV (no bold marks; the "best" row when several logs)."""
  head, rows = table_rows(labels, logs, radii, digits)
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(["log", "images"] + [f"r={r:g}" for r in radii] + ["acr"])
  writer.writerows([[cell.strip("*") for cell in row] for row in rows])
  epath.Path(path).write_text(text.getvalue())


def latex_table(labels, logs, radii=DEFAULT_RADII, digits=3, caption=None):
  """The report as a LaTeX tabular (booktabs rules; the best values in \\textbf)."""
  head, rows = table_rows(labels, logs, radii, digits)
  escape = lambda t: t.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace(
      "%", "\\%").replace("&", "\\&").replace("#", "\\#")
  cell = lambda t: f"\\textbf{{{t[2:-2]}}}" if t.startswith("**") else escape(t)
  head = ["log", "images"] + [f"$r = {r:g}$" for r in radii] + ["ACR"]
  lines = ["\\begin{tabular}{l" + "r" * (len(head) - 1) + "}", "\\toprule",
           " & ".join(head) + " \\\\", "\\midrule"]
  lines += [" & ".join(cell(c) for c in row) + " \\\\" for row in rows]
  lines += ["\\bottomrule", "\\end{tabular}"]
  if caption:
    lines = ["% " + caption] + lines
  return "\n".join(lines) + "\n"


def plot_certified_accuracy(path, labels, logs, title=None):
  """Certified accuracy vs radius of every log in one figure, as PNG and PDF.

  `path` ending in .png or .pdf (or neither) names both files. Returns the two
  paths written. matplotlib (Agg canvas, no pyplot state) is imported here.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  stem = os.path.splitext(path)[0] if path.lower().endswith((".png", ".pdf")) else path
  largest = max([float(log_radius(log).max(initial=0.0)) for log in logs] + [0.25])
  grid = np.linspace(0.0, 1.05 * largest, 500)
  figure = Figure(figsize=(6, 4))
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  for label, log in zip(labels, logs):
    axes.plot(grid, certified_accuracy(log_radius(log), log["correct"], grid), label=label)
  axes.set(xlabel="radius (L2, pixel space [0, 1])", ylabel="certified accuracy", ylim=(0, 1),
           xlim=(0, grid[-1]), title=title)
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  written = [stem + ".png", stem + ".pdf"]
  for out in written:
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=150, format=out[-3:])
    epath.Path(out).write_bytes(buffer.getvalue())
  return written


# ----------------------------------------------------------------------------
# Counts, high-probability accuracy, reference logs.
# ----------------------------------------------------------------------------
def log_settings(path):
  """The settings a log was made with (certify's `<stem>.json` or the log's own settings
  line), or None."""
  sidecar = epath.Path(certlog.stem(path) + ".json")
  if sidecar.exists():
    return json.loads(sidecar.read_text()).get("settings")
  return certlog.read_settings(path)


def recompute(log, counts, sigma, alpha):
  """The `certlog.read_log` dict `log` decided again at failure probability `alpha` from
  its class counts ({idx: (n0 counts or None, counts)}, `certlog.read_counts`); sigma is
  the pixel-space noise std it was sampled at. Labels, indices and times are kept."""
  smoothing.check_certify_args(alpha=alpha)
  missing = [int(i) for i in log["idx"] if int(i) not in counts]
  if missing:
    raise ValueError(f"{len(missing)} of {len(log['idx'])} images (first: {missing[0]}) have no "
                     "class counts beside the log; --alpha needs a log written with its counts.")
  out = dict(log)
  decided = []
  for i in log["idx"]:
    selection, estimation = counts[int(i)]
    if log["mode"] == "certify":
      decided.append(smoothing.certify_from_counts(np.asarray(selection), np.asarray(estimation),
                                                   sigma, alpha))
    else:
      decided.append((smoothing.predict_from_counts(np.asarray(estimation), alpha), 0.0))
  out["predict"] = np.array([p for p, _ in decided], np.int64)
  out["correct"] = out["predict"] == log["label"]
  if log["mode"] == "certify":
    out["radius"] = np.array([r for _, r in decided], np.float64)
  return out


def high_probability_accuracy(accuracy, num_images, alpha, rho):
  """Cohen et al.'s high-probability certified accuracy (their analyze.py): the
  approximate accuracy over `num_images` images minus alpha + sqrt(alpha (1 - alpha)
  ln(1/rho) / m) + ln(1/rho) / (3 m); a lower bound on the certified accuracy that holds
  with probability >= 1 - rho. accuracy: a float or an array."""
  if not 0.0 < rho < 1.0:
    raise ValueError(f"--rho must be a number in (0, 1), got {rho!r}.")
  m, log_rho = max(int(num_images), 1), math.log(1.0 / rho)
  return (np.asarray(accuracy, np.float64) - alpha - math.sqrt(alpha * (1 - alpha) * log_rho / m)
          - log_rho / (3 * m))


def high_probability_table(labels, logs, alphas, rho, radii=DEFAULT_RADII, digits=3):
  """Markdown table of `high_probability_accuracy` per log (its alpha) and radius."""
  accuracies, _ = summarize(logs, radii)
  head = ["log", "images", "alpha"] + [f"r = {r:g}" for r in radii]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, log, alpha, row in zip(labels, logs, alphas, accuracies):
    bound = high_probability_accuracy(row, len(log["idx"]), alpha, rho)
    lines.append("| " + " | ".join([label, str(len(log["idx"])), f"{alpha:g}"] +
                                   [f"{v:.{digits}f}" for v in bound]) + " |")
  return "\n".join(lines)


def reference_warning(label, log, reference, reference_path):
  """One line when `log`'s labels differ from `reference`'s at shared indices (the two
  certify other images), else None."""
  ours = dict(zip(log["idx"].tolist(), log["label"].tolist()))
  theirs = dict(zip(reference["idx"].tolist(), reference["label"].tolist()))
  shared = sorted(set(ours) & set(theirs))
  wrong = [i for i in shared if ours[i] != theirs[i]]
  if not shared:
    return (f"warning: {label} shares no image index with {reference_path}; they certify "
            "other images.")
  if wrong:
    return (f"warning: {label}: {len(wrong)} of {len(shared)} images shared with "
            f"{reference_path} have other labels (idx {wrong[0]}: {ours[wrong[0]]} here, "
            f"{theirs[wrong[0]]} there); they certify other images.")
  return None


def parse_radii(text):
  """'0,0.25,0.5' -> (0.0, 0.25, 0.5); each radius must be a number >= 0."""
  try:
    radii = tuple(float(r) for r in text.split(",") if r.strip())
  except ValueError:
    radii = ()
  if not radii or min(radii) < 0:
    raise ValueError(f"--radii must be a comma-separated list of numbers >= 0, got {text!r}.")
  return radii


def _parser():
  parser = argparse.ArgumentParser(prog="python -m rrcm_jax.report",
                                   description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("logs", nargs="+", metavar="LOG", help="Cohen-format certification logs")
  parser.add_argument("--radii", default=",".join(f"{r:g}" for r in DEFAULT_RADII),
                      help="comma-separated radii (pixel space)")
  parser.add_argument("--labels", default=None, help="comma-separated row labels (default: paths)")
  parser.add_argument("--digits", type=int, default=3, help="decimals in the Markdown table")
  parser.add_argument("--csv", default=None, help="also write the table as CSV here")
  parser.add_argument("--latex", default=None, help="also write the table as LaTeX here")
  parser.add_argument("--plot", default=None, help="write the plot here (.png and .pdf)")
  parser.add_argument("--alpha", type=float, default=None,
                      help="recompute the logs at this alpha from their class counts")
  parser.add_argument("--sigma", type=float, default=None,
                      help="pixel-space sigma for --alpha (default: the log's settings)")
  parser.add_argument("--rho", type=float, default=None,
                      help="also print Cohen et al.'s high-probability accuracy at this rho")
  parser.add_argument("--log-alpha", type=float, default=None,
                      help="for --rho: the alpha of logs without recorded settings (Cohen's: 0.001)")
  parser.add_argument("--reference", default=None,
                      help="a log whose labels ours must share (e.g. Cohen et al.'s)")
  return parser


def _load(path, alpha, sigma):
  """(log, the alpha its rows hold): read, or recomputed at `alpha` from its counts."""
  log = certlog.read_log(path)
  settings = log_settings(path) or {}
  if alpha is None:
    return log, settings.get("alpha")
  sigma = sigma if sigma is not None else settings.get("sigma")
  if sigma is None and log["mode"] == "certify":
    raise ValueError(f"{path} records no sigma; give --sigma (pixel space).")
  return recompute(log, certlog.read_counts(path), sigma, alpha), alpha


def main(argv=None):
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    radii = parse_radii(args.radii)
    labels = args.logs if args.labels is None else args.labels.split(",")
    if len(labels) != len(args.logs):
      raise ValueError(f"--labels must give one label per log ({len(args.logs)}), got {len(labels)}.")
    loaded = [_load(path, args.alpha, args.sigma) for path in args.logs]
    logs = [log for log, _ in loaded]
    alphas = [args.log_alpha if a is None else a for _, a in loaded]
    check_finite_radii(labels, logs)
    if args.rho is not None and None in alphas:
      raise ValueError("--rho needs each log's alpha: logs without recorded settings (such as "
                       "Cohen et al.'s) take it from --log-alpha.")
    reference = certlog.read_log(args.reference) if args.reference else None
  except (ValueError, OSError) as e:
    parser.exit(2, f"error: {e}\n")
  if reference is not None:
    for label, log in zip(labels, logs):
      warning = reference_warning(label, log, reference, args.reference)
      if warning:
        print(warning, file=sys.stderr)
  print(markdown_table(labels, logs, radii, args.digits))
  if args.rho is not None:
    print(f"\nHigh-probability certified accuracy (Cohen et al.; holds with probability "
          f">= {1 - args.rho:g}):\n")
    print(high_probability_table(labels, logs, alphas, args.rho, radii, args.digits))
  if args.csv:
    write_csv(args.csv, labels, logs, radii)
  if args.latex:
    epath.Path(args.latex).write_text(latex_table(labels, logs, radii, args.digits))
  if args.plot:
    for path in plot_certified_accuracy(args.plot, labels, logs):
      print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
  main()
