"""Certification logs in Cohen et al.'s format: one tab-separated line per image.

CERTIFY logs have the header `idx label predict radius correct time`, PREDICT
logs `idx label predict correct time`; `predict` is -1 for an abstention,
`radius` is in pixel space [0, 1], `time` is seconds (the reader also accepts
`H:MM:SS.ffffff`, as in Cohen et al.'s ImageNet log).

A `LogWriter` appends and flushes one line per image, resumes an existing log
(reporting which indices are done) and never truncates it. With several
processes, process k writes `<path>.p<k>` and `merge_logs(path)` joins the
parts into `<path>`, sorted by idx.

Healing after a kill: a last row without its newline was cut short; readers
skip it and a `LogWriter` moves it to `<path>.torn` (one-line notice), so the
image is certified again. Rows that differ only in `time` are one result
(kept once); rows of one image with different results are an error. The
settings a log was made with are kept in the log itself, as a comment line
`# rrcm-jax settings: {json}` before the header (`check_or_write_settings`);
our readers skip `#` lines (pandas needs `comment="#"`).
"""
import glob
import json
import os
import re
import sys

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


def _split(path):
  """(leading `#` lines, complete lines after them) of a log; text after the last
  newline (a row cut short by a kill) is left out."""
  with open(path, errors="replace") as f:
    lines = [line.rstrip("\r") for line in f.read().split("\n")[:-1]]
  comments = 0
  while comments < len(lines) and lines[comments].startswith("#"):
    comments += 1
  return lines[:comments], lines[comments:]


def _result(parsed, mode):
  """What a row says about its image: every column but `time`."""
  return tuple(parsed[key] for key in COLUMNS[mode] if key != "time")


def _read_rows(path):
  """(mode, {idx: raw line}) of an existing log; ValueError if not Cohen's format."""
  _, lines = _split(path)
  first = lines[0] if lines else ""
  mode = next((m for m in COLUMNS if first == header(m)), None)
  if mode is None:
    raise ValueError(f"{path} is not a Cohen-format certification log: its first line is {first!r}, "
                     f"but must be {header('certify')!r} or {header('predict')!r}.")
  rows, results = {}, {}
  for number, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    try:
      parsed = _parse_row(line, mode)
    except ValueError:
      raise ValueError(f"{path}, line {number}: {line!r} is not a complete {mode} row "
                       f"({header(mode)!r}).") from None
    idx = parsed["idx"]
    if idx in results and results[idx] != _result(parsed, mode):
      raise ValueError(f"{path}: image {idx} appears twice with different results.")
    rows.setdefault(idx, line)   # the same result twice (a restart's repeat): kept once
    results[idx] = _result(parsed, mode)
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
    heal(path)
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


def heal(path):
  """Moves a last row cut short (no trailing newline: the writer was killed in the middle
  of it) from the log at `path` to `<path>.torn`, with a one-line notice, so that its
  image is certified again. Returns the moved text, or None when the log is whole."""
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    data = f.read()
  if not data or data.endswith(b"\n"):
    return None
  cut = data.rfind(b"\n") + 1
  torn = data[cut:]
  with open(path + ".torn", "ab") as f:
    f.write(torn + b"\n")
    f.flush()
    os.fsync(f.fileno())
  with open(path, "r+b") as f:
    f.truncate(cut)
    os.fsync(f.fileno())
  text = torn.decode(errors="replace")
  print(f"note: {path} ended in a row cut short ({text!r}); moved it to {path}.torn, and its "
        "image will be certified again.", file=sys.stderr, flush=True)
  return text


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
      if idx in merged and (_result(_parse_row(merged[idx], mode), mode) !=
                            _result(_parse_row(line, mode), mode)):
        raise ValueError(f"image {idx} has different results in {source} and another part.")
      merged.setdefault(idx, line)
  if len(modes) > 1:
    raise ValueError(f"cannot merge logs of different modes {sorted(modes)}: {sources}.")
  comments = next((c for c in (_split(s)[0] for s in sources) if c), [])   # the settings line
  temporary = path + ".merging"
  with open(temporary, "w") as f:
    f.write("\n".join(comments + [header(modes.pop())] + [merged[i] for i in sorted(merged)]) +
            "\n")
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


# ----------------------------------------------------------------------------
# The settings a log was made with, kept in the log itself.
# ----------------------------------------------------------------------------
SETTINGS_PREFIX = "# rrcm-jax settings: "


def read_settings(path):
  """The settings recorded in the log's `# rrcm-jax settings:` line, or None."""
  if not os.path.exists(path):
    return None
  for line in _split(path)[0]:
    if line.startswith(SETTINGS_PREFIX):
      return json.loads(line[len(SETTINGS_PREFIX):])
  return None


def _flat(settings, prefix=""):
  flat = {}
  for key, value in settings.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def _compare(path, saved, ours, ignore):
  saved, ours = _flat(saved), _flat(json.loads(json.dumps(ours)))   # tuples -> lists, as saved
  for key in sorted((set(saved) | set(ours)) - set(ignore)):
    if saved.get(key) != ours.get(key):
      raise ValueError(f"{path} was made with {key}={saved.get(key)!r}, this run has "
                       f"{ours.get(key)!r}; restart with the same settings or use another workdir.")


def check_or_write_settings(path, settings, ignore=("classifier.train_flops",), write=True):
  """Binds the log at `path` to `settings` (a JSON-able dict with "mode": what its rows
  depend on), so that a restart with other settings cannot append to it.

  A new (or empty) log gets the settings line and the header. A log that has the line is
  compared with it key by key (dotted keys in `ignore` excepted): ValueError, one sentence
  naming the first key that differs. A log written before settings were kept in logs
  adopts them when its rows agree with the `<log>.json` beside it (certify's record);
  with rows and neither record, nothing can tell which settings made them: ValueError.
  Several processes: all call it before the LogWriters open (all raise alike), only
  process 0 with `write` (the file is replaced atomically, so readers see either version).
  """
  mode = settings["mode"]
  line = SETTINGS_PREFIX + json.dumps(settings, sort_keys=True)
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    if write:
      _replace(path, [line, header(mode)])
    return
  saved = read_settings(path)
  if saved is not None:
    _compare(path, saved, settings, ignore)
    return
  found, rows = _read_rows(path)
  sidecar = (path[:-len(".tsv")] if path.endswith(".tsv") else path) + ".json"
  if os.path.exists(sidecar):
    with open(sidecar) as f:
      _compare(path, json.load(f)["settings"], settings, ignore)
  elif rows:
    raise ValueError(f"{path} has {len(rows)} rows but no record of the settings they were made "
                     f"with (no settings line, no {sidecar}); certify into another workdir.")
  if found != mode:
    raise ValueError(f"{path} is a {found}-mode log, but mode is {mode!r}: pick another log "
                     f"path or the matching mode.")
  if write:
    heal(path)
    comments, lines = _split(path)
    _replace(path, comments + [line] + lines)


def _replace(path, lines):
  """Writes `lines` to `path` atomically (a temporary file, then a rename)."""
  temporary = path + ".settings"
  with open(temporary, "w") as f:
    f.write("\n".join(lines) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)
