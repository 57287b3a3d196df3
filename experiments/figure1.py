r"""Figure 1 of the paper from certification logs: certified accuracy against inference cost.

  python -m experiments.figure1 \
      --logs "rRCM σ=0.25=results/replication/certify_rrcm_sigma0.25/certify_sigma0.25.tsv" \
             "DDS σ=0.25=results/fashion_mnist_dds/certify/certify_sigma0.25.tsv@0.1" \
      --out results/x/figure1.png [--table results/x/figure1.md] [--n 100000] [--n0 100]

One panel per radius (default r = 0.25 and r = 0.5, pixel-space L2): the
certified accuracy of each log (abstentions count as wrong, `rrcm_jax.report`)
against the seconds one certified image costs at n noisy samples (log axis),
one color per method and one marker shape per σ. The cost is the measured one:
the median over the log's images of (n0 + n) / time (the `time` column, so the
first image's compilation does not count) gives noisy samples per second, and
an image at n = 100,000, n0 = 100 costs (n0 + n) / that. Inference FLOPs per
noisy sample come from the log's settings (`inference_flops_per_sample`,
written by `rrcm_jax.certify`) or, for logs written before it recorded them,
from `@GFLOP` after the path (GFLOP per noisy sample; it also overrides a
recorded count).

A log is given as LABEL=PATH[@GFLOP]: the label is everything before the last
`=`, so labels may contain `=` and `σ` ("rRCM σ=0.25=path") but paths may not
contain `=`; a bare PATH is labelled from its settings (method and σ). The
table (Markdown) is printed and, with --table, written; the figure is written
as PNG and PDF beside it. Every file is read and written through
`etils.epath` (local or gs://).
"""
import argparse
import dataclasses
import io
import os
import re
import sys

import numpy as np
from etils import epath

from rrcm_jax import certlog, report

RADII = (0.25, 0.5)
N_PAPER, N0_PAPER = 100_000, 100   # the paper's CERTIFY sample sizes
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


@dataclasses.dataclass
class Point:
  """One certification log as a point of Figure 1.

  certified: {radius (pixel space): certified accuracy (abstain = wrong)} at
  `report.DEFAULT_RADII` and RADII; flops_per_sample: inference FLOPs per noisy
  sample (None: unknown); samples_s: median over images of (n0 + n) / time.
  """
  label: str
  sigma: float
  log: str
  images: int
  certified: dict
  flops_per_sample: float | None
  samples_s: float
  n0: int
  n: int
  acr: float = 0.0


def _default_label(settings, sigma, log):
  """"DDS σ=0.25" for DDS logs, else the classifier workdir's name without its sigma suffix."""
  if settings.get("method") == "dds":
    name = "DDS"
  else:
    source = str((settings.get("classifier") or {}).get("source") or certlog.stem(log))
    name = re.sub(r"[_-]sigma[\d.]+$", "", os.path.basename(source.rstrip("/"))) or source
  return f"{name} σ={sigma:g}"


def load_point(log, label=None, flops_per_sample=None):
  """The Point of the certification log at `log` (local or gs://).

  sigma, n0 and n come from the settings beside the log (`report.log_settings`);
  `flops_per_sample` (FLOPs per noisy sample), when given, replaces the settings'
  `inference_flops_per_sample` (logs written before certify recorded it have none).
  """
  log = str(log)
  if not epath.Path(log).exists():
    raise ValueError(f"{log} does not exist; give the .tsv log that rrcm_jax.certify wrote.")
  rows = certlog.read_log(log)
  settings = report.log_settings(log)
  if not settings or "sigma" not in settings or "n" not in settings:
    raise ValueError(f"{log} has no settings record (sigma, n0, n beside it, "
                     f"{certlog.settings_path(log)}); Figure 1 needs a log rrcm_jax.certify wrote.")
  if not len(rows["idx"]):
    raise ValueError(f"{log} has no certified image yet.")
  report.check_finite_radii([log], [rows])
  sigma, n = float(settings["sigma"]), int(settings["n"])
  n0 = int(settings.get("n0", 0)) if rows["mode"] == "certify" else 0
  radius = report.log_radius(rows)
  radii = sorted(set(report.DEFAULT_RADII) | set(RADII))
  accuracy = report.certified_accuracy(radius, rows["correct"], np.array(radii))
  times = np.maximum(rows["time"], 1e-3)   # the log keeps milliseconds
  if flops_per_sample is None:
    flops_per_sample = settings.get("inference_flops_per_sample")
  return Point(label=label or _default_label(settings, sigma, log), sigma=sigma, log=log,
               images=len(rows["idx"]),
               certified={float(r): float(a) for r, a in zip(radii, accuracy)},
               flops_per_sample=None if flops_per_sample is None else float(flops_per_sample),
               samples_s=float(np.median((n0 + n) / times)), n0=n0, n=n,
               acr=report.acr(radius, rows["correct"]))


def seconds_per_image(point, n=N_PAPER, n0=N0_PAPER):
  """Seconds one certified image costs at n estimation and n0 selection samples, at the
  log's measured rate."""
  return (n0 + n) / point.samples_s


def certified_at(point, r):
  """The certified accuracy of `point` at radius r (read from its log when not kept)."""
  r = float(r)
  if r not in point.certified:
    rows = certlog.read_log(point.log)
    point.certified[r] = float(report.certified_accuracy(report.log_radius(rows),
                                                         rows["correct"], r))
  return point.certified[r]


def markdown_table(points, radii=RADII, n=N_PAPER, n0=N0_PAPER):
  """Markdown: method, σ, images, certified accuracy per radius, ACR, GFLOP per noisy
  sample, measured samples/s, seconds per certified image at (n0, n)."""
  head = (["method", "σ", "images"] + [f"r = {r:g}" for r in radii] +
          ["ACR", "GFLOP / noisy sample", "samples/s (measured)", f"s / image (n = {n:,})"])
  lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
  for p in points:
    flops = "-" if p.flops_per_sample is None else f"{p.flops_per_sample / 1e9:.4g}"
    cells = ([p.label, f"{p.sigma:g}", str(p.images)] +
             [f"{certified_at(p, r):.3f}" for r in radii] +
             [f"{p.acr:.3f}", flops, f"{p.samples_s:,.0f}",
              f"{seconds_per_image(p, n, n0):,.1f}"])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def method_of(label):
  """The label without its σ part ("rRCM σ=0.25" -> "rRCM"): points of one method share a color."""
  return re.sub(r"[\s,;(]*(σ|sigma)\s*=?\s*[\d.]+\)?", "", label).strip() or label


LABELLED_POINTS = 4   # more points than this: the legend alone says which is which


def _label_heights(xs, ys, width=0.3, height=0.045):
  """Heights of labels right of points at (xs, axes fraction; ys): from the top down, a
  label that would overlap one already placed moves below it."""
  placed, heights = [], [0.0] * len(ys)
  for i in sorted(range(len(ys)), key=lambda i: -ys[i]):
    y = ys[i]
    while True:
      close = [py for px, py in placed   # 0.999: a label moved just below another clears it
               if abs(xs[i] - px) < width and abs(y - py) < 0.999 * height]
      if not close:
        break
      y = min(close) - height
    placed.append((xs[i], y))
    heights[i] = y
  return heights


def draw(points, path, radii=RADII, n=N_PAPER, n0=N0_PAPER):
  """Figure 1: one panel per radius, certified accuracy against seconds per certified image
  (log axis); color = method, marker = σ, the legend below the panels, and each point
  labelled when there are at most LABELLED_POINTS. Writes `path` (.png) and the .pdf beside
  it; returns the paths written."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  path = str(path)
  stem = os.path.splitext(path)[0] if path.lower().endswith((".png", ".pdf")) else path
  methods = list(dict.fromkeys(method_of(p.label) for p in points))
  sigmas = sorted({p.sigma for p in points})
  colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
  markers = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(sigmas)}
  labelled = len(points) <= LABELLED_POINTS
  columns = 2 if max(len(m) for m in methods) > 40 else 3
  legend_rows = -(-(len(methods) + len(sigmas)) // columns)
  figure = Figure(figsize=(6 * len(radii), 4.2 + 0.22 * legend_rows))
  FigureCanvasAgg(figure)
  seconds = [seconds_per_image(p, n, n0) for p in points]
  for k, r in enumerate(radii):
    axes = figure.add_subplot(1, len(radii), k + 1)
    low, high = min(seconds), max(seconds)
    ys = [certified_at(p, r) for p in points]
    for p, x, y in zip(points, seconds, ys):
      axes.scatter([x], [y], s=60, color=colors[method_of(p.label)], marker=markers[p.sigma],
                   edgecolors="black", linewidths=0.5, zorder=3)
    span = np.log(high * 3) - np.log(low / 3)   # the x-axis, in log units
    heights = _label_heights([(np.log(x) - np.log(low / 3)) / span for x in seconds], ys)
    for p, x, y, label_y in zip(points, seconds, ys, heights) if labelled else ():
      axes.annotate(p.label, (x, y), xytext=(x * np.exp(0.07 * span), label_y + 0.012),
                    fontsize=7, arrowprops=None if label_y == y else dict(
                        arrowstyle="-", color="gray", linewidth=0.5, shrinkA=0, shrinkB=3))
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axes.xaxis.set_minor_formatter(ticker.NullFormatter())
    axes.set_xlim(low / 3, high * 3)
    axes.set(xlabel=f"seconds per certified image (n = {n:,}, measured rate)",
             ylabel="certified accuracy", title=f"r = {r:g} (L2, pixel space)", ylim=(0, 1))
    axes.grid(alpha=0.3, which="both")
  handles = ([Line2D([], [], color=colors[m], marker="o", linestyle="", label=m) for m in methods]
             + [Line2D([], [], color="gray", marker=markers[s], linestyle="", label=f"σ = {s:g}")
                for s in sigmas])
  figure.legend(handles=handles, fontsize=8, loc="lower center", ncol=columns, frameon=False)
  figure.tight_layout(rect=(0, 0.055 * legend_rows * 4.2 / figure.get_figheight(), 1, 1))
  written = [stem + ".png", stem + ".pdf"]
  for out in written:
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=150, format=out[-3:])
    epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(out).write_bytes(buffer.getvalue())
  return written


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------
def parse_spec(text):
  """'LABEL=PATH[@GFLOP]' -> (label or None, path, FLOPs per noisy sample or None); the label
  is what precedes the last '=', GFLOP what follows the last '@'."""
  label, _, path = text.rpartition("=")
  flops = None
  if "@" in path:
    path, _, gflop = path.rpartition("@")
    try:
      flops = float(gflop) * 1e9
    except ValueError:
      flops = -1.0
    if not flops > 0:
      raise ValueError(f"--logs {text!r}: after '@' must come the GFLOP per noisy sample, a "
                       f"number > 0, got {gflop!r}.")
  if not path or (text.count("=") and not label.strip()):
    raise ValueError(f"--logs {text!r} must be LABEL=PATH[@GFLOP] or PATH[@GFLOP] (the label "
                     "is what precedes the last '=').")
  return label.strip() or None, path, flops


def load_specs(specs):
  """Points of 'LABEL=PATH[@GFLOP]' specs; every point must know its FLOPs per sample."""
  parsed = [parse_spec(text) for text in specs]   # all checked before any log is read
  points = []
  for text, (label, path, flops) in zip(specs, parsed):
    point = load_point(path, label, flops)
    if point.flops_per_sample is None:
      raise ValueError(f"{path} records no inference_flops_per_sample (written before certify "
                       f"recorded it); give the GFLOP per noisy sample as {text}@GFLOP.")
    points.append(point)
  return points


def _parser():
  parser = argparse.ArgumentParser(prog="python -m experiments.figure1",
                                   description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--logs", nargs="+", required=True, metavar="LABEL=PATH[@GFLOP]",
                      help="certification logs, one per method and σ")
  parser.add_argument("--out", required=True, help="the figure (.png; the .pdf is written beside)")
  parser.add_argument("--table", default=None, help="also write the Markdown table here")
  parser.add_argument("--radii", default=",".join(f"{r:g}" for r in RADII),
                      help="comma-separated radii, one panel each (pixel space)")
  parser.add_argument("--n", type=int, default=N_PAPER, help="estimation samples per image")
  parser.add_argument("--n0", type=int, default=N0_PAPER, help="selection samples per image")
  return parser


def main(argv=None):
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    radii = report.parse_radii(args.radii)
    if args.n < 1 or args.n0 < 0:
      raise ValueError(f"--n must be >= 1 and --n0 >= 0, got {args.n} and {args.n0}.")
    points = load_specs(args.logs)
  except (ValueError, OSError) as e:
    parser.exit(2, f"error: {e}\n")
  table = markdown_table(points, radii, args.n, args.n0)
  print(table)
  if args.table:
    epath.Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(args.table).write_text(table + "\n")
  written = draw(points, args.out, radii, args.n, args.n0)
  print("wrote " + ", ".join(written + ([args.table] if args.table else [])), file=sys.stderr)
  return points


if __name__ == "__main__":
  main()
