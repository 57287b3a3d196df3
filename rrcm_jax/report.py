"""Certified accuracy and average certified radius from certification logs.

    python -m rrcm_jax.report LOG [LOG ...] [--radii 0,0.25,0.5] [--labels a,b]
        [--csv out.csv] [--plot out.png]

prints a Markdown table: per log, the certified accuracy at each radius r
(fraction of the logged images that are correct with radius >= r;
abstentions count as wrong) and the ACR (mean of radius * correct). With
several logs (e.g. one per sigma) the best value per radius is bold and a
"best" row gives the envelope, as the papers' tables mark it. `--plot` draws
certified accuracy against radius for all logs in one figure (PNG and PDF).
Radii are L2 norms in pixel space [0, 1]. PREDICT logs have no radius: their
images count as radius 0 (accuracy of the smoothed classifier at r = 0).
"""
import argparse
import csv
import os
import sys

import numpy as np

from rrcm_jax import certlog

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
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["log", "images"] + [f"r={r:g}" for r in radii] + ["acr"])
    writer.writerows([[cell.strip("*") for cell in row] for row in rows])


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
    figure.savefig(out, dpi=150)
  return written


def parse_radii(text):
  """'0,0.25,0.5' -> (0.0, 0.25, 0.5); each radius must be a number >= 0."""
  try:
    radii = tuple(float(r) for r in text.split(",") if r.strip())
  except ValueError:
    radii = ()
  if not radii or min(radii) < 0:
    raise ValueError(f"--radii must be a comma-separated list of numbers >= 0, got {text!r}.")
  return radii


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m rrcm_jax.report", description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("logs", nargs="+", metavar="LOG", help="Cohen-format certification logs")
  parser.add_argument("--radii", default=",".join(f"{r:g}" for r in DEFAULT_RADII),
                      help="comma-separated radii (pixel space)")
  parser.add_argument("--labels", default=None, help="comma-separated row labels (default: paths)")
  parser.add_argument("--digits", type=int, default=3, help="decimals in the Markdown table")
  parser.add_argument("--csv", default=None, help="also write the table as CSV here")
  parser.add_argument("--plot", default=None, help="write the plot here (.png and .pdf)")
  args = parser.parse_args(argv)
  try:
    radii = parse_radii(args.radii)
    labels = args.logs if args.labels is None else args.labels.split(",")
    if len(labels) != len(args.logs):
      raise ValueError(f"--labels must give one label per log ({len(args.logs)}), got {len(labels)}.")
    logs = [certlog.read_log(path) for path in args.logs]
    check_finite_radii(labels, logs)
  except (ValueError, OSError) as e:
    parser.exit(2, f"error: {e}\n")
  print(markdown_table(labels, logs, radii, args.digits))
  if args.csv:
    write_csv(args.csv, labels, logs, radii)
  if args.plot:
    for path in plot_certified_accuracy(args.plot, labels, logs):
      print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
  main()
