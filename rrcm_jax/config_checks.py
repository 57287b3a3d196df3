"""Checks a training run makes before it writes anything: its schedule keys, batch sizes and
learning rates (`validate_training`), and, when it resumes, that the settings its checkpoints
depend on are those of the workdir's config.json (`check_resume`).

Each raises ValueError with one sentence naming the key, its value and what is allowed.
"""
import copy
import json
import math

from etils import epath

# What a checkpoint's state and the rest of its trajectory depend on: a resumed run whose
# values differ stops, unless config.allow_changes names the key (or a section above it).
BINDING = ("model", "batch_size", "seed", "optim", "total_steps", "epochs", "task", "sigma")

_EVERY_OR_OFF = ("knn_every", "eval_every")        # >= 1, or 0: off
_EVERY_OR_NONE = ("save_every", "latest_every")    # >= 1, or None: default
_BATCHES = ("batch_size", "eval_batch_size", "knn.batch_size")
_SHARDED = ("batch_size", "eval_batch_size")       # split over the devices


def _get(config, dotted):
  """config's value at a dotted key; KeyError when absent."""
  value = config
  for part in dotted.split("."):
    if not hasattr(value, "keys") or part not in value.keys():
      raise KeyError(dotted)
    value = value[part]
  return value


def _is_int(value):
  return isinstance(value, int) and not isinstance(value, bool)


def validate_training(config, device_count=1):
  """Schedule keys, batch sizes and learning rates of a pre-training or fine-tuning config.

  log_every >= 1; knn_every, eval_every >= 0 (0: off); save_every, latest_every >= 1 or
  None; total_steps, epochs, steps_per_epoch >= 1 (steps_per_epoch may be None); batch
  sizes > 0, the sharded ones (batch_size, eval_batch_size) divisible by `device_count`
  (the k-NN monitor pads its batches); optim.lr (and any other *lr* key of optim)
  a finite number > 0; profile_start, profile_steps >= 0, profile_start below the run's
  steps when profiling (a window that runs past the last step ends with the run). Keys a
  config does not have are not checked.
  """
  def present(key):
    try:
      return True, _get(config, key)
    except KeyError:
      return False, None

  checks = [(k, "an integer >= 1", lambda v: _is_int(v) and v >= 1)
            for k in ("log_every", "total_steps", "epochs")]
  checks += [(k, "an integer >= 1, or 0 (off)", lambda v: _is_int(v) and v >= 0)
             for k in _EVERY_OR_OFF]
  checks += [(k, "an integer >= 1, or None", lambda v: v is None or (_is_int(v) and v >= 1))
             for k in _EVERY_OR_NONE + ("steps_per_epoch",)]
  for key, allowed, ok in checks:
    found, value = present(key)
    if found and not ok(value):
      raise ValueError(f"config.{key}={value!r} must be {allowed}.")
  for key in _BATCHES:
    found, value = present(key)
    if not found:
      continue
    if not (_is_int(value) and value > 0):
      raise ValueError(f"config.{key}={value!r} must be an integer > 0.")
    if key in _SHARDED and value % device_count:
      nearest = max(device_count, value // device_count * device_count)
      raise ValueError(f"config.{key}={value} must be divisible by the number of devices "
                       f"({device_count}), e.g. {nearest}.")
  _check_profile(config, present)
  found, optim = present("optim")
  for key in sorted(optim.keys()) if found and hasattr(optim, "keys") else []:
    value = optim[key]
    is_rate = key == "lr" or key.endswith("_lr") or key.startswith("lr_")
    if is_rate and not isinstance(value, bool):   # per_epoch_lr is a switch, not a rate
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
          math.isfinite(value) and value > 0):
        raise ValueError(f"config.optim.{key}={value!r} must be a finite number > 0.")


def _check_profile(config, present):
  """profile_start, profile_steps >= 0; a window that opens before the run's last step."""
  for key in ("profile_start", "profile_steps"):
    found, value = present(key)
    if found and not (_is_int(value) and value >= 0):
      raise ValueError(f"config.{key}={value!r} must be an integer >= 0"
                       f"{' (0: no profiling)' if key == 'profile_steps' else ''}.")
  _, start = present("profile_start")
  _, steps = present("profile_steps")
  _, total = present("total_steps")
  if not total:   # fine-tuning: epochs × steps_per_epoch, when both are known
    _, epochs = present("epochs")
    _, per_epoch = present("steps_per_epoch")
    total = epochs * per_epoch if _is_int(epochs) and _is_int(per_epoch) else None
  if steps and start is not None and _is_int(total) and start >= total:
    raise ValueError(f"config.profile_start={start} must be below the run's {total} steps "
                     "(the trace opens after profile_start steps), or set profile_steps=0.")


# ----------------------------------------------------------------------------
# Resuming with the same settings.
# ----------------------------------------------------------------------------
def flatten(tree, prefix=""):
  """A JSON-like tree of dicts as {"a.b.c": leaf}: how saved configs and certification
  settings are compared key by key."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def _as_json(config):
  text = config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else json.dumps(
      config)
  return json.loads(text)


def allowed_changes(config):
  """The dotted keys of config.allow_changes ("key1,key2"; absent or empty: none)."""
  value = config.get("allow_changes", "") if hasattr(config, "get") else ""
  names = [n.strip() for n in (value or "").split(",") if n.strip()]
  for name in names:
    if name.split(".")[0] not in BINDING:
      raise ValueError(f"config.allow_changes names {name!r}, which is not a setting a resumed "
                       f"run is checked for; those are {', '.join(BINDING)} and the keys under "
                       "them.")
  return names


def _allowed(key, names):
  return any(key == n or key.startswith(n + ".") for n in names)


def binding_differences(saved, config, allow=()):
  """[(dotted key, saved value, new value)] of the binding settings (`BINDING`) that differ
  between `saved` (the workdir's config.json as a dict) and `config`, except `allow`."""
  old, new = flatten(saved), flatten(_as_json(config))
  differences = []
  for key in sorted(set(old) | set(new)):
    if key.split(".")[0] not in BINDING or _allowed(key, allow):
      continue
    if key in old and key in new and old[key] != new[key]:
      differences.append((key, old[key], new[key]))
  return differences


def _with_saved_values(config, saved, keys):
  """A copy of `config` with the dotted `keys` set back to their `saved` values; values that
  follow them through references (the warm-up that follows total_steps) follow again."""
  probe = copy.deepcopy(config)
  old = flatten(saved)
  with probe.unlocked():
    for key in keys:
      section, _, name = key.rpartition(".")
      try:
        target = _get(probe, section) if section else probe
        target[name] = old[key]
      except (KeyError, TypeError, ValueError, AttributeError):
        pass   # a key this config lacks, or a value its type refuses: compared as it is
  return probe


def unexplained_differences(saved, config, allow=()):
  """`binding_differences` left once the allowed keys (and what follows them) are set back
  to their saved values, the key that explains most others first: with total_steps changed,
  total_steps is named rather than the warm-up that follows it."""
  allowed = [key for key in flatten(saved) if _allowed(key, allow)]
  if allowed:
    config = _with_saved_values(config, saved, allowed)
  differences = binding_differences(saved, config, allow)
  if len(differences) <= 1:
    return differences
  left = {d[0]: len(binding_differences(saved, _with_saved_values(config, saved, [d[0]]), allow))
          for d in differences}
  return sorted(differences, key=lambda d: left[d[0]])


def _has_checkpoints(workdir):
  directory = epath.Path(workdir) / "checkpoints"
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_resume(workdir, config):
  """Stops a resumed run (a workdir with checkpoints and config.json) whose binding settings
  differ from the recorded ones, naming the first key (old -> new), unless
  config.allow_changes names it. Reads only; a fresh workdir passes."""
  allow = allowed_changes(config)
  path = epath.Path(workdir) / "config.json"
  if not path.exists() or not _has_checkpoints(workdir):
    return
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); restore it, or move the workdir aside "
                     "to start again.") from None
  differences = unexplained_differences(saved, config, allow)
  if differences:
    key, old, new = differences[0]
    more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
    raise ValueError(f"--workdir={workdir} holds a run made with {key}={old!r} and this run has "
                     f"{key}={new!r}{more}; resume with the same settings, use another workdir, or "
                     f"allow it with --config.allow_changes={key}.")


def run_trainer(train, config, workdir):
  """A trainer's whole run: the checks that need nothing written, then, holding the workdir's
  lock for the whole run, the resume checks and `train(config, workdir)`; returns its result."""
  import jax  # pylint: disable=g-import-not-at-top
  from rrcm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  validate_training(config, jax.device_count())
  with workdir_lib.lock(workdir):   # one run per workdir, for the whole run
    check_resume(workdir, config)
    return train(config, workdir)
