r"""The k-NN monitor's curves of a pre-training run (metrics.jsonl), as a PNG.

  python -m rrcm_jax.plot_metrics WORKDIR out.png [--csv out.csv]

One panel per noise level (clean, model-space noise_0.5, ...): k-NN accuracy
against the pre-training step for each monitored encoder (online, EMA), the
raw-pixel baseline as a dashed line. The rows come from the monitor
(`config.knn_every`, rrcm_jax/evaluators/knn_monitor.py); `--csv` also writes
them as a table (step, then one column per metric).
"""
import argparse
import io
import json
import sys

from etils import epath


def knn_rows(workdir):
  """{metric: [(step, value)]} of every knn/<encoder>/<level> key in WORKDIR/metrics.jsonl,
  by step (a resumed run's repeated step keeps its last value)."""
  path = epath.Path(workdir) / "metrics.jsonl"   # local or gs://
  if not path.exists():
    raise ValueError(f"{path} does not exist; pass a pre-training workdir.")
  series = {}
  for line in path.read_text().splitlines():
    if line.strip():
      row = json.loads(line)
      for key, value in row.items():
        if key.startswith("knn/") and key.count("/") == 2:
          series.setdefault(key, {})[int(row["step"])] = float(value)
  if not series:
    raise ValueError(f"{path} holds no k-NN rows (knn/<encoder>/<level>); pre-train with "
                     "--config.knn_every=K.")
  return {k: sorted(v.items()) for k, v in series.items()}


def _levels(series):
  levels = sorted({k.split("/")[2] for k in series},
                  key=lambda n: (n != "clean", float(n.split("_")[-1]) if n != "clean" else 0))
  return levels


def plot(series, path, title=None):
  """Draws `series` (knn_rows) into `path` (PNG); returns the path."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  levels = _levels(series)
  figure = Figure(figsize=(4.0 * len(levels), 3.4))
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, len(levels), squeeze=False)[0]
  steps = [s for v in series.values() for s, _ in v]
  for ax, level in zip(axes, levels):
    for key, points in sorted(series.items()):
      encoder, key_level = key.split("/")[1:]
      if key_level != level:
        continue
      xs, ys = zip(*points)
      if encoder == "pixels":
        ax.hlines(100 * ys[-1], min(steps), max(steps), colors="grey", linestyles="--",
                  label="raw pixels")
      else:
        ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=encoder)
    ax.set_title(level if level == "clean" else f"model-space noise {level.split('_')[-1]}")
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("k-NN accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, dpi=120, format=str(path).rsplit(".", 1)[-1])
  epath.Path(path).write_bytes(buffer.getvalue())
  return path


def write_csv(series, path):
  keys = sorted(series)
  steps = sorted({s for v in series.values() for s, _ in v})
  values = {k: dict(v) for k, v in series.items()}
  lines = [",".join(["step"] + keys)]
  lines += [",".join([str(s)] + [f"{values[k][s]:.4f}" if s in values[k] else "" for k in keys])
            for s in steps]
  epath.Path(path).write_text("\n".join(lines) + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m rrcm_jax.plot_metrics",
                                   description="k-NN monitor curves of a pre-training workdir.")
  parser.add_argument("workdir")
  parser.add_argument("out", help="the PNG to write")
  parser.add_argument("--csv", default=None, help="also write the rows as CSV")
  parser.add_argument("--title", default=None)
  args = parser.parse_args(argv)
  try:
    series = knn_rows(args.workdir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  plot(series, args.out, args.title)
  if args.csv:
    write_csv(series, args.csv)
  print(f"wrote {args.out}" + (f" and {args.csv}" if args.csv else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
