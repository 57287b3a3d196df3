"""The authors' state-dict layout <-> our Linen variables (rrcm_jax.torch_import).

Numerical parity of imported weights with the authors' code is
tests/test_reference_parity.py; here: names, layouts, round trips, errors,
and reading a real `.pth` written by torch (CI installs torch: `.[torch]`).
"""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from rrcm_jax import models
from rrcm_jax import torch_import

WIDTH, DEPTH, HEADS, PATCH, IMAGE, CHANNELS, HIDDEN, OUT, CLASSES = 32, 2, 2, 4, 8, 3, 16, 8, 5


def _cfg(time_mlp=False):
  cfg = common.model_config(width=WIDTH, depth=DEPTH, num_heads=HEADS, patch_size=PATCH,
                            image_size=IMAGE, channels=CHANNELS, proj_hidden=HIDDEN, proj_out=OUT)
  cfg.time_mlp = time_mlp
  return cfg


def _inputs():
  return (jax.ShapeDtypeStruct((2, IMAGE, IMAGE, CHANNELS), jnp.float32),
          jax.ShapeDtypeStruct((2,), jnp.float32))


def _torch_shapes(time_mlp=False):
  """Documented names (docs/method.md, State-dict layout) -> torch shapes of the tiny encoder."""
  d, num_tokens = WIDTH, 2 + (IMAGE // PATCH) ** 2
  shapes = {"patch_embed.proj.weight": (d, CHANNELS, PATCH, PATCH), "patch_embed.proj.bias": (d,),
            "cls_token": (1, 1, d), "pos_embed": (1, num_tokens, d),
            "norm.weight": (d,), "norm.bias": (d,)}
  for k in range(DEPTH):
    shapes.update({f"blocks.{k}.norm1.weight": (d,), f"blocks.{k}.norm1.bias": (d,),
                   f"blocks.{k}.attn.qkv.weight": (3 * d, d),
                   f"blocks.{k}.attn.proj.weight": (d, d), f"blocks.{k}.attn.proj.bias": (d,),
                   f"blocks.{k}.norm2.weight": (d,), f"blocks.{k}.norm2.bias": (d,),
                   f"blocks.{k}.mlp.fc1.weight": (4 * d, d), f"blocks.{k}.mlp.fc1.bias": (4 * d,),
                   f"blocks.{k}.mlp.fc2.weight": (d, 4 * d), f"blocks.{k}.mlp.fc2.bias": (d,)})
  if time_mlp:
    shapes.update({"time_embed.0.weight": (4 * d, d), "time_embed.0.bias": (4 * d,),
                   "time_embed.2.weight": (d, 4 * d), "time_embed.2.bias": (d,)})
  shapes.update({"projection_head.0.weight": (HIDDEN, d), "projection_head.3.weight": (HIDDEN, HIDDEN),
                 "projection_head.6.weight": (OUT, HIDDEN)})
  for i in (1, 4):
    for name in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"projection_head.{i}.{name}"] = (HIDDEN,)
    shapes[f"projection_head.{i}.num_batches_tracked"] = ()
  return shapes


def _state_dict(seed=0, time_mlp=False):
  rng = np.random.default_rng(seed)
  return {name: (np.array(0, np.int64) if name.endswith("num_batches_tracked")
                 else rng.standard_normal(shape).astype(np.float32))
          for name, shape in _torch_shapes(time_mlp).items()}


def _classifier_state_dict(seed=0):
  rng = np.random.default_rng(seed + 1)
  state_dict = {"base_model." + k: v for k, v in _state_dict(seed).items()}
  state_dict["linear_head.weight"] = rng.standard_normal((CLASSES, WIDTH)).astype(np.float32)
  state_dict["linear_head.bias"] = rng.standard_normal((CLASSES,)).astype(np.float32)
  return state_dict


def _assert_same_state_dict(got, want):
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].dtype == want[name].dtype, name
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("time_mlp", [False, True])
def test_encoder_round_trip_is_exact(time_mlp):
  state_dict = _state_dict(time_mlp=time_mlp)
  variables = torch_import.load_variables(state_dict, models.rcm_encoder(_cfg(time_mlp)),
                                          _inputs(), "encoder")
  _assert_same_state_dict(torch_import.to_torch(variables, "encoder"), state_dict)


def test_classifier_round_trip_drops_the_projection_head():
  state_dict = _classifier_state_dict()
  model = models.classifier(_cfg(), CLASSES, final_norm=True)
  variables = torch_import.load_variables(state_dict, model, _inputs(), "classifier")
  assert sorted(variables["params"]) == ["head", "vit"]
  kept = {k: v for k, v in state_dict.items() if "projection_head" not in k}
  _assert_same_state_dict(torch_import.to_torch(variables, "classifier"), kept)


def test_layouts():
  state_dict = _state_dict()
  variables = torch_import.from_torch(state_dict, "encoder")
  params, stats = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(params["vit"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                state_dict["blocks.1.attn.qkv.weight"].T)
  np.testing.assert_array_equal(params["vit"]["norm"]["scale"], state_dict["norm.weight"])
  np.testing.assert_array_equal(params["projection_head"]["linear_1"]["kernel"],
                                state_dict["projection_head.3.weight"].T)
  np.testing.assert_array_equal(params["projection_head"]["bn_1"]["scale"],
                                state_dict["projection_head.4.weight"])
  np.testing.assert_array_equal(stats["projection_head"]["bn_0"]["var"],
                                state_dict["projection_head.1.running_var"])


def test_patch_embedding_computes_the_torch_convolution():
  """Our Conv with the imported kernel == torch's conv2d (stride = kernel = p), by hand."""
  state_dict = _state_dict()
  kernel = torch_import.from_torch(state_dict, "encoder")["params"]["vit"]["patch_embed"]
  weight, bias = state_dict["patch_embed.proj.weight"], state_dict["patch_embed.proj.bias"]
  x_nchw = np.random.default_rng(1).standard_normal((2, CHANNELS, IMAGE, IMAGE)).astype(np.float32)
  n = IMAGE // PATCH
  patches = x_nchw.reshape(2, CHANNELS, n, PATCH, n, PATCH)
  want = np.einsum("bcihjw,dchw->bijd", patches, weight) + bias
  conv = nn.Conv(WIDTH, (PATCH, PATCH), strides=(PATCH, PATCH), padding="VALID")
  got = conv.apply({"params": kernel}, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", ["module.", "base_model.", "module.base_model."])
def test_prefixes_are_stripped(prefix):
  state_dict = _state_dict()
  plain = torch_import.from_torch(state_dict, "encoder")
  prefixed = torch_import.from_torch({prefix + k: v for k, v in state_dict.items()}, "encoder")
  jax.tree.map(np.testing.assert_array_equal, prefixed, plain)


def test_wrong_shape_is_named():
  state_dict = _state_dict()
  state_dict["blocks.1.attn.qkv.weight"] = np.zeros((3 * WIDTH, WIDTH // 2), np.float32)
  with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight has shape \(96, 16\), "
                     r"the config expects \(96, 32\)"):
    torch_import.load_variables(state_dict, models.rcm_encoder(_cfg()), _inputs(), "encoder")


def test_wrong_conv_shape_is_named_in_torch_layout():
  state_dict = _classifier_state_dict()
  state_dict["base_model.patch_embed.proj.weight"] = np.zeros((WIDTH, 1, PATCH, PATCH), np.float32)
  model = models.classifier(_cfg(), CLASSES, final_norm=False)
  with pytest.raises(ValueError, match=r"base_model\.patch_embed\.proj\.weight has shape "
                     r"\(32, 1, 4, 4\), the config expects \(32, 3, 4, 4\)"):
    torch_import.load_variables(state_dict, model, _inputs(), "classifier")


@pytest.mark.parametrize("missing", ["norm.weight", "projection_head.4.running_mean"])
def test_missing_key_is_named(missing):
  state_dict = _state_dict()
  del state_dict[missing]
  with pytest.raises(ValueError, match=rf"{missing.replace('.', '[.]')} is missing"):
    torch_import.load_variables(state_dict, models.rcm_encoder(_cfg()), _inputs(), "encoder")


def test_missing_time_mlp_is_named():
  with pytest.raises(ValueError, match=r"time_embed\.0\.(weight|bias) is missing"):
    torch_import.load_variables(_state_dict(), models.rcm_encoder(_cfg(time_mlp=True)),
                                _inputs(), "encoder")


def test_unexpected_keys_are_named():
  state_dict = _state_dict()
  state_dict["blocks.0.attn.qkv.bias"] = np.zeros(3 * WIDTH, np.float32)
  with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.bias \(shape \(96,\)\) is not"):
    torch_import.load_variables(state_dict, models.rcm_encoder(_cfg()), _inputs(), "encoder")
  with pytest.raises(ValueError, match=r"decoder\.weight is not a name"):
    torch_import.from_torch({**state_dict, "decoder.weight": np.zeros(3)}, "encoder")
  with pytest.raises(ValueError, match=r"linear_head\.weight .*kind='classifier'"):
    torch_import.from_torch(_classifier_state_dict(), "encoder")
  with pytest.raises(ValueError, match=r"kind must be one of"):
    torch_import.from_torch(state_dict, "decoder")


def test_load_torch_checkpoint(tmp_path):
  import torch   # CI installs the `torch` extra; this test is not optional.
  online, ema = _state_dict(0), _state_dict(1)
  as_tensors = lambda sd: {k: torch.from_numpy(v) for k, v in sd.items()}
  path = tmp_path / "checkpoint.pth"
  torch.save({"nnet": as_tensors(online), "nnet_ema": as_tensors(ema), "step": 7}, path)
  _assert_same_state_dict(torch_import.load_torch_checkpoint(path, which="nnet"), online)
  _assert_same_state_dict(torch_import.load_torch_checkpoint(path), ema)   # nnet_ema first
  with pytest.raises(ValueError, match=r"no network 'target_model'.*\['nnet', 'nnet_ema'\]"):
    torch_import.load_torch_checkpoint(path, which="target_model")

  bare = tmp_path / "classifier.pth"
  classifier = {"module." + k: v for k, v in _classifier_state_dict().items()}
  torch.save(as_tensors(classifier), bare)
  loaded = torch_import.load_torch_checkpoint(bare)
  _assert_same_state_dict(loaded, classifier)
  model = models.classifier(_cfg(), CLASSES, final_norm=False)
  variables = torch_import.load_variables(loaded, model, _inputs(), "classifier")
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"],
                                classifier["module.linear_head.weight"].T)


def test_load_torch_checkpoint_without_torch(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)   # makes `import torch` fail
  with pytest.raises(ImportError, match=r"pip install -e \.\[torch\]"):
    torch_import.load_torch_checkpoint(tmp_path / "checkpoint.pth")
