"""improved-diffusion / guided-diffusion U-Net state dicts <-> our `UNet` variables.

Our submodules carry the torch module path with "_" for "." before an index
(`input_blocks.3.1.qkv` is `input_blocks_3_1/qkv`), so names map by rule:
weight -> kernel (conv, linear) or scale (GroupNorm), bias -> bias. Layouts:
conv2d (O, I, kh, kw) -> (kh, kw, I, O); the attention's 1×1 conv1d `qkv` and
`proj_out` (O, I, 1) -> Dense (I, O); linear (O, I) -> (I, O). The qkv channel
order needs no permutation: `unet.AttentionBlock` reads torch's order.

Read a `.pt` file with `rrcm_jax.torch_import.load_torch_checkpoint` (the
public DDS checkpoints are bare state dicts), then `unet_variables_from_torch`.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np

from rrcm_jax import torch_import

_CONV1D_MODULES = ("qkv", "proj_out")   # torch conv1d with kernel 1, Dense here
_PREFIX = "module."                      # DataParallel checkpoints


def _flax_path(torch_name, ndim):
  """"input_blocks.1.0.in_layers.2.weight" (ndim 4) -> "input_blocks_1_0/in_layers_2/kernel"."""
  *modules, leaf = torch_name.split(".")
  parts = []
  for token in modules:
    if token.isdigit() and parts:
      parts[-1] += "_" + token
    else:
      parts.append(token)
  if leaf == "weight":
    leaf = "scale" if ndim == 1 else "kernel"
  elif leaf != "bias":
    raise ValueError(f"{torch_name} is not a weight or bias of an ADM U-Net.")
  return "/".join(parts + [leaf])


def _torch_name(flax_path):
  """Inverse of `_flax_path`."""
  *modules, leaf = flax_path.split("/")
  leaf = "bias" if leaf == "bias" else "weight"
  return ".".join([re.sub(r"_(\d+)", r".\1", m) for m in modules] + [leaf])


def _to_flax(array, path):
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 3:
    return array[..., 0].T
  return array.T if array.ndim == 2 else array


def _to_torch(array, path):
  if array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  if array.ndim == 2:
    module = path.split("/")[-2]
    return array.T[..., None] if module in _CONV1D_MODULES else array.T
  return array


def unet_param_shapes(unet):
  """{"path": shape} of the U-Net's params, from `jax.eval_shape` (nothing allocated)."""
  size = 2 ** (len(unet.channel_mult) - 1)
  shapes = jax.eval_shape(lambda: unet.init(
      jax.random.key(0), jnp.zeros((1, size, size, unet.in_channels)), jnp.zeros((1,))))
  return {path: tuple(leaf.shape) for path, leaf in torch_import.flatten_paths(shapes["params"]).items()}


def unet_variables_from_torch(state_dict, unet):
  """{torch name: array} of a `UNetModel` -> {"params": ...} for `unet` (float32 numpy).

  Raises ValueError naming the first unexpected or missing torch key, or the first
  shape that does not fit `unet`'s configuration.
  """
  expected = unet_param_shapes(unet)
  flat = {}
  for name in sorted(state_dict):
    array = np.asarray(state_dict[name], np.float32)
    torch_name = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
    path = _flax_path(torch_name, array.ndim)
    if path not in expected:
      raise ValueError(f"unexpected key {name} in the U-Net state dict: this U-Net configuration "
                       f"has no parameter {path}.")
    value = _to_flax(array, path)
    if value.shape != expected[path]:
      torch_shape = _to_torch(np.zeros(expected[path]), path).shape
      raise ValueError(f"{name} has shape {array.shape}, but this U-Net configuration expects "
                       f"{torch_shape}.")
    flat[path] = value
  missing = [path for path in expected if path not in flat]
  if missing:
    raise ValueError(f"missing key {_torch_name(missing[0])} in the U-Net state dict "
                     f"({len(missing)} missing in all).")
  return {"params": torch_import.unflatten_paths(flat)}


def unet_variables_to_torch(variables):
  """Our U-Net {"params": ...} -> {torch name: float32 numpy array} in the torch layout."""
  flat = torch_import.flatten_paths(jax.device_get(variables["params"]))
  return {_torch_name(path): np.ascontiguousarray(_to_torch(np.asarray(v, np.float32), path))
          for path, v in flat.items()}
