"""timm / Hugging Face ViT state dicts -> params of `pretrained_vits` modules.

The Linen modules mirror the PyTorch module names, so the mapping is by rule,
guided by the parameter tree the model expects (`jax.eval_shape` of its
init): torch `a.3.b.weight` is `a_3/b/kernel` (a Linear (out, in) ->
(in, out); a conv (D, C, p, p) -> (p, p, C, D)) or `a_3/b/scale` (a
LayerNorm); every other leaf keeps its name (`bias`, `cls_token`,
`pos_embed`, `gamma_1`, `q_bias`, `relative_position_bias_table`, ...).

Accepted naming variants: a `module.` prefix (DDP); Hugging Face ViT
checkpoints written before transformers 5 (`vit.encoder.layer.{k}.attention.
attention.query`, `...intermediate.dense`, ...), renamed to the current names
(`vit.layers.{k}.attention.q_proj`, `...mlp.fc1`) as transformers does when it
loads them. Skipped: BEiT's `relative_position_index` buffers (recomputed by
`pretrained_vits.relative_position_index`) and HF's unused `vit.pooler.*`.

Reading files: `.safetensors` (no code execution possible) or `.pth` / `.bin`
/ `.pt` through `torch_import.load_torch_checkpoint`, which refuses pickles
that need more than tensors unless trusted=True.
"""
import os
import re

import jax
import numpy as np

from rrcm_jax import torch_import

_IGNORED = re.compile(r"(^|\.)relative_position_index$|^vit\.pooler\.")
# transformers < 5 -> transformers 5 names of ViTForImageClassification (order matters:
# attention.output.dense before output.dense).
_HF_RENAMES = [
    (re.compile(r"^vit\.encoder\.layer\.(\d+)\."), r"vit.layers.\1."),
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"^(vit\.layers\.\d+)\.output\.dense\."), r"\1.mlp.fc2."),
]
_TO_FLAX = {None: lambda a: a, "linear": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 1, 0)}
_TO_TORCH = {None: lambda a: a, "linear": lambda a: a.T, "conv": lambda a: a.transpose(3, 2, 0, 1)}
_INDEXED = re.compile(r"^(.*)_(\d+)$")
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def canonical_name(name):
  """Strips `module.` and renames old HF ViT names; None for keys that are skipped."""
  while name.startswith("module."):
    name = name[len("module."):]
  if _IGNORED.search(name):
    return None
  if name.startswith("vit.encoder.layer."):
    for pattern, replacement in _HF_RENAMES:
      name = pattern.sub(replacement, name)
  return name


def _transform_of(path, shape):
  if path.endswith("/kernel"):
    return "conv" if len(shape) == 4 else "linear"
  return None


def torch_name(path):
  """Our params path ("blocks_3/attn/qkv/kernel") -> torch name ("blocks.3.attn.qkv.weight")."""
  *modules, leaf = path.split("/")
  parts = []
  for m in modules:
    match = _INDEXED.match(m)
    parts.extend(match.groups() if match else (m,))
  parts.append("weight" if leaf in ("kernel", "scale") else leaf)
  return ".".join(parts)


def _flax_path(name, want):
  """Canonical torch name -> our params path, or None if the model has no such parameter."""
  parts = []
  for p in name.split("."):
    if p.isdigit() and parts:
      parts[-1] += f"_{p}"
    else:
      parts.append(p)
  *modules, leaf = parts
  base = "/".join(modules + [""])
  candidates = [base + "kernel", base + "scale"] if leaf == "weight" else [base + leaf]
  return next((c for c in candidates if c in want), None)


def _as_float32(value):
  """np.asarray, floating point as float32; no copy when it already is (views stay views)."""
  array = np.asarray(value)
  if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32:
    array = array.astype(np.float32)
  return array


def from_torch(state_dict, expected, model_name="model"):
  """A timm / HF state dict -> the model's params tree (numpy float32), checked.

  Args:
    state_dict: torch name -> array (numpy, or anything `np.asarray` reads).
    expected: the model's params tree with `.shape` leaves, e.g.
      `jax.eval_shape(model.init, key, x)["params"]`.
    model_name: how error messages call the model.

  Raises:
    ValueError naming the first key of the state dict that the model lacks,
    the first parameter missing from the state dict, or the first shape that
    differs (in torch layout).
  """
  want = {p: tuple(v.shape) for p, v in torch_import.flatten_paths(expected).items()}
  flat = {}
  for raw_name, value in state_dict.items():
    name = canonical_name(raw_name)
    if name is None:
      continue
    path = _flax_path(name, want)
    if path is None:
      raise ValueError(f"{raw_name} is not a parameter of {model_name}; is the checkpoint for "
                       "this architecture and size?")
    if path in flat:
      raise ValueError(f"{raw_name} appears twice in the state dict (once under another name).")
    transform = _transform_of(path, want[path])
    array = _as_float32(value)
    if array.shape != torch_import.torch_shape(want[path], transform):
      raise ValueError(f"{raw_name} has shape {array.shape}, {model_name} expects "
                       f"{torch_import.torch_shape(want[path], transform)}.")
    flat[path] = _TO_FLAX[transform](array)
  for path, shape in want.items():
    if path not in flat:
      raise ValueError(f"{torch_name(path)} is missing from the state dict; {model_name} expects "
                       f"shape {torch_import.torch_shape(shape, _transform_of(path, shape))}.")
  return torch_import.unflatten_paths(flat)


def to_torch(params):
  """Our params tree -> {torch name: numpy array}: timm names, or current HF names."""
  out = {}
  for path, leaf in torch_import.flatten_paths(params).items():
    array = np.asarray(leaf)
    out[torch_name(path)] = np.ascontiguousarray(_TO_TORCH[_transform_of(path, array.shape)](array))
  return out


def _read_safetensors(path):
  try:
    import torch   # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    from safetensors.numpy import load_file   # pylint: disable=g-import-not-at-top
    return load_file(path)
  from safetensors.torch import load_file   # pylint: disable=g-import-not-at-top
  return {k: torch_import._tensor_to_numpy(v) for k, v in load_file(path).items()}   # pylint: disable=protected-access


def read_state_dict(path, which=None, trusted=False):
  """A checkpoint file -> {torch name: numpy array}.

  Args:
    path: `.safetensors` (needs the `safetensors` package; torch only for
      bfloat16 files) or `.pth` / `.pt` / `.bin` written by `torch.save`
      (needs torch).
    which: for a torch file holding several entries ({"model": ...}), the
      one to read; see `torch_import.load_torch_checkpoint`.
    trusted: let torch unpickle arbitrary objects; only for trusted files.
  """
  if not path.endswith(SUFFIXES):
    raise ValueError(f"checkpoint {path} must end with one of {SUFFIXES}.")
  if not os.path.exists(path):
    raise ValueError(f"checkpoint {path} does not exist.")
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  return torch_import.load_torch_checkpoint(path, which=which, trusted=trusted)


def load_params(source, model, sample_input, model_name=None, which=None, trusted=False):
  """A checkpoint file or state dict -> params of `model` (numpy float32), checked.

  Args:
    source: a path (see `read_state_dict`) or a {torch name: array} mapping.
    model: a `pretrained_vits` module.
    sample_input: x [B, H, W, C] array or jax.ShapeDtypeStruct at the model's
      resolution; only its shape matters (nothing is computed).
  """
  state_dict = read_state_dict(source, which, trusted) if isinstance(source, str) else source
  expected = jax.eval_shape(model.init, jax.random.key(0), sample_input)["params"]
  return from_torch(state_dict, expected, model_name or type(model).__name__)
