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
settings a log was made with are kept beside it in `<log stem>.settings.json`,
written once (`check_or_write_settings`), so the log itself stays in Cohen et
al.'s format: their reader, `pd.read_csv(path, delimiter="\t")`, takes its
first line as the header. Our readers skip `#` lines at the top (logs of
earlier versions kept the settings in such a line).

Class counts: `LogWriter.write(..., counts=(n0_counts, counts))` first appends
the image's counts as a JSON line {idx, n0_counts, counts} to
`<log stem>.counts.jsonl` (`counts_path`; n0_counts is null in PREDICT mode),
then its row to the log, so Cohen's readers never see them. A kill between the
two writes leaves counts without a row: the writer drops such orphans when it
opens, and the image, absent from the log, is certified again (same noise, same
counts). `read_counts` returns them; `report --alpha` recomputes rows from them.

Files go through `etils.epath`: local paths and object stores (gs://) alike.
Object stores cannot append: there a writer keeps the file's text and writes
the whole object again on every flush (an object write is atomic: a reader
sees the previous or the new version, never a torn row). Rewriting costs
O(rows) per image, well below one image's sampling for logs of 10^4 images.
"""
import json
import re
import sys

import numpy as np
from etils import epath

from rrcm_jax.config_checks import flatten
from rrcm_jax.textfiles import Appender as _Appender
from rrcm_jax.textfiles import nonempty as _nonempty
from rrcm_jax.textfiles import read_text as _read_text
from rrcm_jax.textfiles import write_whole as _write_whole

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


def stem(path):
  """The log path without its .tsv suffix (the JSON settings and counts are named from it)."""
  path = str(path)
  return path[:-len(".tsv")] if path.endswith(".tsv") else path


def counts_path(path):
  """`<log stem>.counts.jsonl`: the class counts of the log's images."""
  return stem(path) + ".counts.jsonl"


def _split(path):
  """(leading `#` lines, complete lines after them) of a log; text after the last
  newline (a row cut short by a kill) is left out."""
  lines = [line.rstrip("\r") for line in _read_text(path).split("\n")[:-1]]
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
    path: the log file (local or gs://).
    mode: "certify" or "predict".
    done: set of image indices already in the log (skip them on a restart).
  """

  def __init__(self, path, mode="certify"):
    header(mode)  # validates mode
    self.path, self.mode = str(path), mode
    self.done = set()
    heal(self.path)
    exists = _nonempty(self.path)
    if exists:
      found, rows = _read_rows(self.path)
      if found != mode:
        raise ValueError(f"{path} is a {found}-mode log, but mode is {mode!r}: pick another log "
                         f"path or the matching mode.")
      self.done = set(rows)
    drop_orphan_counts(self.path, self.done)
    self._log = _Appender(self.path)
    self._counts = _Appender(counts_path(self.path))
    if not exists:
      self._log.append(header(mode) + "\n")

  def write(self, idx, label, predict, correct, seconds, radius=None, counts=None):
    """Appends the row of image `idx` (radius in pixel space; CERTIFY mode only) and flushes;
    `counts` = (n0 selection counts or None, n estimation counts), per class, goes first
    to `counts_path`."""
    idx = int(idx)
    if idx in self.done:
      raise ValueError(f"image {idx} is already in {self.path}; a restart must skip done indices.")
    if (radius is None) != (self.mode == "predict"):
      raise ValueError(f"radius must be given in certify mode and only there (mode {self.mode!r}).")
    fields = [str(idx), str(int(label)), str(int(predict))]
    if radius is not None:
      fields.append(repr(float(radius)))
    fields += [str(int(bool(correct))), f"{float(seconds):.3f}"]
    if counts is not None:
      selection, estimation = counts
      self._counts.append(json.dumps(dict(
          idx=idx, n0_counts=None if selection is None else [int(c) for c in selection],
          counts=[int(c) for c in estimation])) + "\n")
    self._log.append("\t".join(fields) + "\n")
    self.done.add(idx)

  def close(self):
    self._log.close()
    self._counts.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def heal(path):
  """Moves a last row cut short (no trailing newline: the writer was killed in the middle
  of it) from the log at `path` to `<path>.torn`, with a one-line notice, so that its
  image is certified again. Returns the moved text, or None when the log is whole."""
  path = str(path)
  if not epath.Path(path).exists():
    return None
  data = epath.Path(path).read_bytes()
  if not data or data.endswith(b"\n"):
    return None
  cut = data.rfind(b"\n") + 1
  text = data[cut:].decode(errors="replace")
  torn = _Appender(path + ".torn")
  torn.append(text + "\n")
  torn.close()
  _write_whole(path, data[:cut])
  print(f"note: {path} ended in a row cut short ({text!r}); moved it to {path}.torn, and its "
        "image will be certified again.", file=sys.stderr, flush=True)
  return text


def part_paths(path):
  """Existing per-process parts `<path>.p<k>`, ordered by k."""
  path = epath.Path(path)
  if not path.parent.exists():
    return []
  parts = [str(path.parent / p.name) for p in path.parent.iterdir()
           if p.name.startswith(path.name + ".p") and _PART.search(p.name)]
  return sorted(parts, key=lambda p: int(_PART.search(p).group(1)))


# ----------------------------------------------------------------------------
# Class counts beside the log.
# ----------------------------------------------------------------------------
def _count_lines(path):
  """[(idx, JSON line)] of a counts file (a last line cut short by a kill is left out)."""
  if not epath.Path(path).exists():
    return []
  lines = _read_text(path).split("\n")[:-1]
  return [(int(json.loads(line)["idx"]), line) for line in lines if line.strip()]


def read_counts(path):
  """{idx: (n0 counts or None, counts)} (int64 arrays) beside the log at `path` (its
  per-process parts' too); {} when there are none."""
  counts = {}
  for source in [path] + part_paths(path):
    for idx, line in _count_lines(counts_path(source)):
      entry = json.loads(line)
      selection = entry.get("n0_counts")
      counts.setdefault(idx, (None if selection is None else np.asarray(selection, np.int64),
                              np.asarray(entry["counts"], np.int64)))
  return counts


def drop_orphan_counts(path, done):
  """Rewrites the counts beside the log at `path` without the images not in `done` (the
  log's indices): counts written just before a kill, whose row never was. Their images
  are certified again. Returns the dropped indices."""
  lines = _count_lines(counts_path(path))
  kept, seen = [], set()
  for idx, line in lines:
    if idx in done and idx not in seen:
      kept.append(line)
      seen.add(idx)
  dropped = sorted({idx for idx, _ in lines} - done)
  text = "".join(line + "\n" for line in kept)
  if epath.Path(counts_path(path)).exists() and text != _read_text(counts_path(path)):
    _write_whole(counts_path(path), text)
    if dropped:
      print(f"note: {counts_path(path)} held counts of images {dropped[:5]} without a row in "
            f"{path}; dropped them, and those images will be certified again.",
            file=sys.stderr, flush=True)
  return dropped


def merge_logs(path, parts=None):
  """Joins per-process logs (default: `part_paths(path)`) and `path` itself into `path`.

  Rows are sorted by idx; rows already in `path` are kept, so nothing is
  lost; the parts are left in place. The file is replaced atomically.
  Returns the number of rows in the merged log.
  """
  path = str(path)
  parts = part_paths(path) if parts is None else [str(p) for p in parts]
  sources = ([path] if _nonempty(path) else []) + parts
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
  counts = {}
  for source in sources:
    counts.update({i: line for i, line in _count_lines(counts_path(source)) if i in merged})
  if counts:   # before the log: counts without a row are dropped on a restart
    _write_whole(counts_path(path), "".join(counts[i] + "\n" for i in sorted(counts)))
  _write_whole(path, "\n".join(comments + [header(modes.pop())] +
                                [merged[i] for i in sorted(merged)]) + "\n")
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
# The settings a log was made with, kept beside it in `<log stem>.settings.json`.
# ----------------------------------------------------------------------------
SETTINGS_PREFIX = "# rrcm-jax settings: "   # where logs of earlier versions kept them


def settings_path(path):
  """`<log stem>.settings.json`: the settings the log's rows were made with, written once."""
  return stem(path) + ".settings.json"


def _legacy_settings(path):
  """The settings of a `# rrcm-jax settings:` line at the top of the log (earlier versions)."""
  if not epath.Path(path).exists():
    return None
  for line in _split(path)[0]:
    if line.startswith(SETTINGS_PREFIX):
      return json.loads(line[len(SETTINGS_PREFIX):])
  return None


def read_settings(path):
  """The settings the log at `path` was made with (`settings_path`, or the settings line of
  a log of an earlier version), or None."""
  sidecar = epath.Path(settings_path(path))
  if sidecar.exists():
    try:
      return json.loads(sidecar.read_text())["settings"]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{sidecar} is not a settings record ({e}); restore it, or certify into "
                       "another workdir.") from None
  return _legacy_settings(path)


def _compare(path, saved, ours, ignore):
  saved, ours = flatten(saved), flatten(json.loads(json.dumps(ours)))   # tuples -> lists, as saved
  for key in sorted((set(saved) | set(ours)) - set(ignore)):
    if saved.get(key) != ours.get(key):
      raise ValueError(f"{path} was made with {key}={saved.get(key)!r}, this run has "
                       f"{ours.get(key)!r}; restart with the same settings or use another workdir.")


def check_or_write_settings(path, settings,
                            ignore=("classifier.train_flops", "inference_flops_per_sample"),
                            write=True):
  """Binds the log at `path` to `settings` (a JSON-able dict with "mode": what its rows
  depend on), so that a restart with other settings cannot append to it.

  The settings live in `settings_path(path)`, written once and never rewritten, so the
  log itself stays Cohen et al.'s format (their reader takes its first line as the
  header) and losing certify's `<log stem>.json` record does not unbind it. A run whose
  settings differ from the recorded ones (dotted keys in `ignore` excepted) gets
  ValueError, one sentence naming the first key that differs. A log without the file
  adopts the settings of its `# rrcm-jax settings:` line (earlier versions; the line is
  then removed) or of `<log stem>.json` when they agree; with rows and no record at all,
  nothing can tell which settings made them: ValueError. Several processes: all call it
  before the LogWriters open (all raise alike), only process 0 with `write`.
  """
  mode = settings["mode"]
  saved, legacy = read_settings(path), _legacy_settings(path)
  found, rows = _read_rows(path) if _nonempty(path) else (mode, {})
  record = epath.Path(stem(path) + ".json")
  if saved is None and record.exists():
    saved = json.loads(record.read_text())["settings"]
  if saved is not None:
    _compare(path, saved, settings, ignore)
  elif rows:
    raise ValueError(f"{path} has {len(rows)} rows but no record of the settings they were made "
                     f"with (no {settings_path(path)}, no {record}); certify into another workdir.")
  if found != mode:
    raise ValueError(f"{path} is a {found}-mode log, but mode is {mode!r}: pick another log "
                     f"path or the matching mode.")
  if not write:
    return
  sidecar = epath.Path(settings_path(path))
  if not sidecar.exists():
    _write_whole(sidecar, json.dumps(dict(settings=settings), indent=1, sort_keys=True) + "\n")
  if legacy is not None:   # the log becomes plain Cohen format again
    heal(path)
    _, lines = _split(path)
    _write_whole(path, "\n".join(lines or [header(mode)]) + "\n")
