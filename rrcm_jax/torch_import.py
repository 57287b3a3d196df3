"""The authors' PyTorch state dicts <-> our Linen variables.

The mapping works on plain arrays (numpy, or anything `np.asarray` reads);
only `load_torch_checkpoint`, which reads a `.pth` file, needs torch
(`pip install -e .[torch]`, the CPU wheel is enough).

Layout (docs/method.md, State-dict layout): an encoder (`nnet`, `nnet_ema`,
`target_model`) is `patch_embed.proj.*`, `cls_token`, `pos_embed`,
`blocks.{k}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`,
`projection_head.{0,3,6}.weight` (Linear) and `projection_head.{1,4}.*`
(BatchNorm), plus `time_embed.{0,2}.*` for the optional time MLP. A
fine-tuned classifier prefixes the encoder with `base_model.` and adds
`linear_head.{weight,bias}`; DDP checkpoints may prefix `module.`.

Conversions: torch Linear (out, in) -> kernel (in, out); conv (D, C, p, p) ->
(p, p, C, D); LayerNorm weight -> scale; BatchNorm weight/bias -> params
scale/bias and running_mean/running_var -> batch_stats mean/var. The qkv
matrix needs only the transpose: torch splits its 3D outputs as (3, H, hd),
and `models.Attention` reshapes them the same way.
"""
from collections.abc import Mapping
import re

import jax
import numpy as np
from etils import epath

KINDS = ("encoder", "classifier")
_PREFIXES = ("module.", "base_model.")
_NETWORK_KEYS = ("nnet_ema", "nnet", "model", "state_dict", "target_model")

_BLOCK_RULES = [
    ("norm1.weight", "norm1/scale", None), ("norm1.bias", "norm1/bias", None),
    ("attn.qkv.weight", "attn/qkv/kernel", "linear"), ("attn.qkv.bias", "attn/qkv/bias", None),
    ("attn.proj.weight", "attn/proj/kernel", "linear"), ("attn.proj.bias", "attn/proj/bias", None),
    ("norm2.weight", "norm2/scale", None), ("norm2.bias", "norm2/bias", None),
    ("mlp.fc1.weight", "fc1/kernel", "linear"), ("mlp.fc1.bias", "fc1/bias", None),
    ("mlp.fc2.weight", "fc2/kernel", "linear"), ("mlp.fc2.bias", "fc2/bias", None),
]
_BN_RULES = [("weight", "params", "scale"), ("bias", "params", "bias"),
             ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var")]

# (torch name, "collection/path" in our variables, transform); {k} is a block index.
_ENCODER_RULES = [
    ("patch_embed.proj.weight", "params/vit/patch_embed/kernel", "conv"),
    ("patch_embed.proj.bias", "params/vit/patch_embed/bias", None),
    ("cls_token", "params/vit/cls_token", None),
    ("pos_embed", "params/vit/pos_embed", None),
    ("time_embed.0.weight", "params/vit/time_mlp_1/kernel", "linear"),
    ("time_embed.0.bias", "params/vit/time_mlp_1/bias", None),
    ("time_embed.2.weight", "params/vit/time_mlp_2/kernel", "linear"),
    ("time_embed.2.bias", "params/vit/time_mlp_2/bias", None),
    *[(f"blocks.{{k}}.{t}", f"params/vit/blocks_{{k}}/{f}", tr) for t, f, tr in _BLOCK_RULES],
    ("norm.weight", "params/vit/norm/scale", None),
    ("norm.bias", "params/vit/norm/bias", None),
    *[(f"projection_head.{3 * i}.weight", f"params/projection_head/linear_{i}/kernel", "linear")
      for i in range(3)],
    *[(f"projection_head.{3 * i + 1}.{t}", f"{c}/projection_head/bn_{i}/{f}", None)
      for i in range(2) for t, c, f in _BN_RULES],
]
_HEAD_RULES = [("linear_head.weight", "params/head/kernel", "linear"),
               ("linear_head.bias", "params/head/bias", None)]


def _pattern(template):
  return re.compile(re.escape(template).replace(r"\{k\}", r"(?P<k>\d+)") + "$")


_RULES = [(_pattern(t), t, _pattern(f), f, tr) for t, f, tr in _ENCODER_RULES + _HEAD_RULES]
_IGNORED = re.compile(r"projection_head\.[14]\.num_batches_tracked$")

# Torch layout -> ours, and back; the shape maps give error messages in torch terms.
_TO_FLAX = {None: lambda a: a, "linear": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 1, 0)}
_TO_TORCH = {None: lambda a: a, "linear": lambda a: a.T, "conv": lambda a: a.transpose(3, 2, 0, 1)}


def torch_shape(shape, transform):
  """Our parameter shape -> the PyTorch tensor's shape for a "linear"/"conv"/None transform."""
  if transform == "linear":
    return tuple(shape[::-1])
  if transform == "conv":
    return tuple(shape[i] for i in (3, 2, 0, 1))
  return tuple(shape)


def _check_kind(kind):
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")


def _strip_prefixes(name):
  stripped = True
  while stripped:
    stripped = False
    for prefix in _PREFIXES:
      if name.startswith(prefix):
        name, stripped = name[len(prefix):], True
  return name


def _to_flax_location(name, kind):
  """Torch name (prefixes stripped) -> ("collection/path", transform), or None to skip."""
  if _IGNORED.match(name) or (kind == "classifier" and name.startswith("projection_head.")):
    return None   # the classifier drops the projection head (docs/method.md, Fine-tuning)
  if kind == "encoder" and name.startswith("linear_head."):
    raise ValueError(f"{name} belongs to a fine-tuned classifier; load this state dict with "
                     "kind='classifier'.")
  for torch_re, _, _, flax_template, transform in _RULES:
    m = torch_re.match(name)
    if m:
      return flax_template.format(**m.groupdict()), transform
  raise ValueError(f"{name} is not a name of the rRCM encoder/classifier layout "
                   "(docs/method.md, State-dict layout); is this a checkpoint of another "
                   "architecture?")


def _to_torch_location(path, kind):
  """Our "collection/path" -> (torch name, transform); None if it has no torch name."""
  for _, torch_template, flax_re, _, transform in _RULES:
    m = flax_re.match(path)
    if m:
      name = torch_template.format(**m.groupdict())
      if kind == "classifier" and not name.startswith("linear_head."):
        name = "base_model." + name
      return name, transform
  return None


def flatten_paths(tree):
  """Nested dict -> {"collection/a/b": leaf}."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def unflatten_paths(flat):
  """{"collection/a/b": leaf} -> nested dict (the inverse of `flatten_paths`)."""
  tree = {}
  for path, leaf in flat.items():
    node = tree
    *parents, last = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return tree


def _as_float32(value):
  array = np.asarray(value)
  return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def from_torch(state_dict, kind="encoder"):
  """The authors' state dict -> {"params": ..., "batch_stats": ...} (numpy, float32).

  Args:
    state_dict: torch name -> array ((out, in) Linear, (D, C, p, p) conv), with
      or without the `module.` / `base_model.` prefixes.
    kind: "encoder" (tree of `models.rcm_encoder`: params {"vit", "projection_head"},
      batch_stats {"projection_head"}) or "classifier" (tree of `models.classifier`:
      params {"vit", "head"}; the projection head in the checkpoint is dropped).

  Returns:
    Nested dicts of numpy arrays. BatchNorm `num_batches_tracked` is ignored.
    Shapes are not checked here: see `check_against` / `load_variables`.
  """
  _check_kind(kind)
  flat = {}
  for raw_name, value in state_dict.items():
    name = _strip_prefixes(raw_name)
    location = _to_flax_location(name, kind)
    if location is None:
      continue
    path, transform = location
    if path in flat:
      raise ValueError(f"{raw_name} appears twice in the state dict (once with a prefix).")
    flat[path] = _TO_FLAX[transform](_as_float32(value))
  variables = unflatten_paths(flat)
  variables.setdefault("params", {})
  variables.setdefault("batch_stats", {})
  return variables


def to_torch(variables, kind="encoder"):
  """Our variables -> {torch name: numpy array}, the inverse of `from_torch`.

  A classifier's encoder names carry the `base_model.` prefix and its head is
  `linear_head.*`; it has no projection head (load it in torch with
  strict=False). BatchNorm gets `num_batches_tracked = 0` (int64), which torch
  reads only with momentum=None.
  """
  _check_kind(kind)
  state_dict = {}
  for path, leaf in flatten_paths(variables).items():
    location = _to_torch_location(path, kind)
    if location is None:
      raise ValueError(f"{path} has no name in the authors' {kind} layout.")
    name, transform = location
    state_dict[name] = np.ascontiguousarray(_TO_TORCH[transform](np.asarray(leaf)))
    if name.endswith("running_mean"):
      state_dict[name[:-len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
  return state_dict


def _describe(path, shape, kind):
  """(torch name, shape in torch layout) for an error message."""
  location = _to_torch_location(path, kind)
  if location is None:
    return path, tuple(shape)
  name, transform = location
  return name, torch_shape(shape, transform)


def check_against(variables, expected, kind=None):
  """Raises ValueError naming the first missing key, unexpected key or wrong shape.

  Args:
    variables: {"params": ..., "batch_stats": ...} from `from_torch`.
    expected: the same tree from the model, leaves with a `.shape` (e.g.
      `jax.eval_shape(model.init, ...)`).
    kind: "encoder" or "classifier" for the names in the message; by default
      "classifier" when `expected` has a params "head".
  """
  if kind is None:
    kind = "classifier" if "head" in expected.get("params", {}) else "encoder"
  _check_kind(kind)
  got = {p: tuple(np.shape(v)) for p, v in flatten_paths(variables).items()}
  want = {p: tuple(v.shape) for p, v in flatten_paths(expected).items()}
  for path, shape in want.items():
    if path not in got:
      name, their_shape = _describe(path, shape, kind)
      raise ValueError(f"{name} is missing from the state dict; the config expects shape "
                       f"{their_shape}.")
  for path, shape in got.items():
    if path not in want:
      name, their_shape = _describe(path, shape, kind)
      raise ValueError(f"{name} (shape {their_shape}) is not a parameter of the configured "
                       "model; is the config (time_mlp, depth, qkv bias) the checkpoint's?")
    if shape != want[path]:
      name, their_shape = _describe(path, shape, kind)
      raise ValueError(f"{name} has shape {their_shape}, the config expects "
                       f"{_describe(path, want[path], kind)[1]}.")


def load_variables(state_dict, model, sample_inputs, kind="encoder"):
  """`from_torch` + `check_against` the shapes `model.init(key, *sample_inputs)` gives.

  Args:
    state_dict: the authors' state dict (torch names -> arrays).
    model: `models.rcm_encoder(cfg)` or `models.classifier(cfg, ...)`.
    sample_inputs: (x [B,H,W,C] scaled model space, t [B]) arrays or
      jax.ShapeDtypeStructs; only their shapes matter (nothing is computed).
    kind: "encoder" or "classifier".

  Returns:
    {"params": ..., "batch_stats": ...} of numpy float32 arrays (a classifier
    has an empty "batch_stats").
  """
  _check_kind(kind)
  expected = jax.eval_shape(model.init, jax.random.key(0), *sample_inputs)
  variables = from_torch(state_dict, kind)
  check_against(variables, expected, kind)
  return variables


def _is_state_dict(obj):
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items())


def _tensor_to_numpy(tensor):
  tensor = tensor.detach().cpu()
  if tensor.is_floating_point():
    tensor = tensor.float()   # numpy has no bfloat16
  return tensor.numpy()


def load_torch_checkpoint(path, which=None, trusted=False):
  """Reads a `.pth` file -> {torch name: numpy array} for `from_torch`.

  Args:
    path: a file written by `torch.save`.
    which: for a file holding several networks, the key of the one to read
      ("nnet_ema", "nnet", "target_model", "model", "state_dict"); by default
      the first of those present. Ignored for a bare state dict.
    trusted: unpickle arbitrary objects (torch.load(weights_only=False)); only
      for files from a source you trust.
  """
  try:
    import torch   # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Reading a .pth checkpoint needs torch: run `pip install -e .[torch]`.") from e
  try:
    with epath.Path(path).open("rb") as f:   # local or gs://
      obj = torch.load(f, map_location="cpu", weights_only=not trusted)
  except Exception as e:   # torch raises UnpicklingError and friends
    if trusted:
      raise
    raise ValueError(f"{path} holds objects that torch.load(weights_only=True) refuses; pass "
                     "trusted=True if you trust this file.") from e
  if not _is_state_dict(obj):
    if not isinstance(obj, Mapping):
      raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    networks = sorted(k for k in obj if _is_state_dict(obj[k]))
    if which is None:
      which = next((k for k in _NETWORK_KEYS if k in networks), None)
      if which is None:
        raise ValueError(f"{path} holds none of the networks {_NETWORK_KEYS}; pass which= "
                         f"one of {networks}.")
    if which not in networks:
      raise ValueError(f"{path} has no network {which!r}; it holds {networks}.")
    obj = obj[which]
  return {k: _tensor_to_numpy(v) if hasattr(v, "detach") else np.asarray(v)
          for k, v in obj.items()}
