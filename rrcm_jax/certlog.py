"""Certification logs in Cohen et al.'s format: one tab-separated line per image.

CERTIFY logs have the header `idx label predict radius correct time`, PREDICT
logs `idx label predict correct time`; `predict` is -1 for an abstention,
`radius` is in pixel space [0, 1], `time` is seconds (the reader also accepts
`H:MM:SS.ffffff`, as in Cohen et al.'s ImageNet log).

A `LogWriter` appends and flushes one line per image, resumes an existing log
(reporting which indices are done) and never truncates it. With several
processes, process k writes `<path>.p<k>` and `merge_logs(path)` joins the
parts into `<path>`, sorted by idx.
"""
import glob
import os
import re

import numpy as np

COLUMNS = {
    "certify": ("idx", "label", "predict", "radius", "correct", "time"),
    "predict": ("idx", "label", "predict", "correct", "time"),
}
_TIME_HMS = re.compile(r"^(?:(\d+) days?, )?(\d+):(\d\d):(\d\d(?:\.\d*)?)$")
_PART = re.compile(r"\.p(\d+)$")


def header(mode):
  """The header line (without newline) of a log in `mode` ("certify" or "predict")."""
  if mode not in COLUMNS:
    raise ValueError(f"mode must be one of {sorted(COLUMNS)}, got {mode!r}.")
  return "\t".join(COLUMNS[mode])


def process_log_path(path, process_index=0, process_count=1):
  """`path` for a single process, `<path>.p<k>` for process k of several."""
  return path if process_count == 1 else f"{path}.p{process_index}"


def parse_time(text):
  """Seconds from `12.5` or from `H:MM:SS.ffffff` (str of a datetime.timedelta)."""
  match = _TIME_HMS.match(text.strip())
  if match is None:
    return float(text)
  days, hours, minutes, seconds = match.groups()
  return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _read_rows(path):
  """(mode, {idx: raw line}) of an existing log; ValueError if not Cohen's format."""
  with open(path, errors="replace") as f:
    lines = f.read().split("\n")
  first = lines[0].rstrip("\r")
  mode = next((m for m in COLUMNS if first == header(m)), None)
  if mode is None:
    raise ValueError(f"{path} is not a Cohen-format certification log: its first line is {first!r}, "
                     f"but must be {header('certify')!r} or {header('predict')!r}.")
  rows = {}
  for number, line in enumerate(lines[1:], start=2):
    line = line.rstrip("\r")
    if not line.strip():
      continue
    try:
      idx = _parse_row(line, mode)["idx"]
    except ValueError:
      raise ValueError(f"{path}, line {number}: {line!r} is not a complete {mode} row "
                       f"({header(mode)!r}).") from None
    if idx in rows and rows[idx] != line:
      raise ValueError(f"{path}: image {idx} appears twice with different results.")
    rows[idx] = line
  return mode, rows


def _parse_row(line, mode):
  fields = line.split("\t")
  if len(fields) != len(COLUMNS[mode]):
    raise ValueError(line)
  row = dict(zip(COLUMNS[mode], fields))
  parsed = {key: int(row[key]) for key in ("idx", "label", "predict", "correct")}
  parsed["time"] = parse_time(row["time"])
  if mode == "certify":
    parsed["radius"] = float(row["radius"])
  return parsed


class LogWriter:
  """Appends one flushed line per image to a Cohen-format log; resumes, never truncates.

  Attributes:
    path: the log file.
    mode: "certify" or "predict".
    done: set of image indices already in the log (skip them on a restart).
  """

  def __init__(self, path, mode="certify"):
    header(mode)  # validates mode
    self.path, self.mode = path, mode
    self.done = set()
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
      found, rows = _read_rows(path)
      if found != mode:
        raise ValueError(f"{path} is a {found}-mode log, but mode is {mode!r}: pick another log "
                         f"path or the matching mode.")
      self.done = set(rows)
    self._file = open(path, "a")
    if not exists:
      self._append(header(mode) + "\n")
    elif not _ends_with_newline(path):
      self._append("\n")

  def write(self, idx, label, predict, correct, seconds, radius=None):
    """Appends the row of image `idx` (radius in pixel space; CERTIFY mode only) and flushes."""
    idx = int(idx)
    if idx in self.done:
      raise ValueError(f"image {idx} is already in {self.path}; a restart must skip done indices.")
    if (radius is None) != (self.mode == "predict"):
      raise ValueError(f"radius must be given in certify mode and only there (mode {self.mode!r}).")
    fields = [str(idx), str(int(label)), str(int(predict))]
    if radius is not None:
      fields.append(repr(float(radius)))
    fields += [str(int(bool(correct))), f"{float(seconds):.3f}"]
    self._append("\t".join(fields) + "\n")
    self.done.add(idx)

  def _append(self, text):
    self._file.write(text)
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self):
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _ends_with_newline(path):
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def part_paths(path):
  """Existing per-process parts `<path>.p<k>`, ordered by k."""
  parts = [p for p in glob.glob(glob.escape(path) + ".p*") if _PART.search(p)]
  return sorted(parts, key=lambda p: int(_PART.search(p).group(1)))


def merge_logs(path, parts=None):
  """Joins per-process logs (default: `part_paths(path)`) and `path` itself into `path`.

  Rows are sorted by idx; rows already in `path` are kept, so nothing is
  lost; the parts are left in place. The file is replaced atomically.
  Returns the number of rows in the merged log.
  """
  parts = part_paths(path) if parts is None else list(parts)
  sources = ([path] if os.path.exists(path) and os.path.getsize(path) > 0 else []) + parts
  if not sources:
    raise ValueError(f"no log to merge: neither {path} nor any {path}.p<k> exists.")
  modes, merged = set(), {}
  for source in sources:
    mode, rows = _read_rows(source)
    modes.add(mode)
    for idx, line in rows.items():
      if idx in merged and merged[idx] != line:
        raise ValueError(f"image {idx} has different results in {source} and another part.")
      merged[idx] = line
  if len(modes) > 1:
    raise ValueError(f"cannot merge logs of different modes {sorted(modes)}: {sources}.")
  temporary = path + ".merging"
  with open(temporary, "w") as f:
    f.write("\n".join([header(modes.pop())] + [merged[i] for i in sorted(merged)]) + "\n")
  os.replace(temporary, path)
  return len(merged)


def read_log(path):
  """The rows of a log as numpy arrays, sorted by idx.

  Returns:
    dict with "idx", "label", "predict" (int64, -1 = abstain), "correct"
    (bool), "time" (float64 seconds) and, for CERTIFY logs, "radius" (float64,
    pixel space); "mode" is "certify" or "predict".
  """
  mode, rows = _read_rows(path)
  parsed = [_parse_row(rows[i], mode) for i in sorted(rows)]
  result = {"mode": mode}
  for key in COLUMNS[mode]:
    dtype = np.float64 if key in ("radius", "time") else np.int64
    result[key] = np.array([row[key] for row in parsed], dtype)
  result["correct"] = result["correct"].astype(bool)
  return result
