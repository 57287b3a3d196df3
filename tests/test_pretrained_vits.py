"""DDS's off-the-shelf classifiers (rrcm_jax.pretrained_vits / _import / _classifiers).

Parity: small timm / transformers models with random weights, imported, give
the same logits. Full-size architectures: parameter counts and the complete
name/shape mapping, built on torch's meta device (no weights allocated).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrcm_jax import pretrained_classifiers
from rrcm_jax import pretrained_import
from rrcm_jax import pretrained_vits

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

RTOL = 1e-5   # max |Δlogit| / max |logit|, float32


def _randomize(model, seed=0):
  """Perturbs every parameter (incl. zero-initialized bias tables and layer scales)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _torch_logits(model, x_nhwc):
  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
  return getattr(out, "logits", out).numpy()


def _images(h=32, w=32, seed=0):
  return np.random.default_rng(seed).normal(size=(2, h, w, 3)).astype(np.float32)


def _assert_parity(torch_model, flax_model, x, state_dict=None):
  sd = _state_dict(torch_model) if state_dict is None else state_dict
  params = pretrained_import.load_params(sd, flax_model, jax.ShapeDtypeStruct(x.shape, jnp.float32))
  want = _torch_logits(torch_model, x)
  got = np.asarray(jax.jit(flax_model.apply)({"params": params}, x))
  assert got.shape == want.shape
  assert np.abs(got - want).max() <= RTOL * np.abs(want).max()


def _timm_vit(**kw):
  return timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10, **kw)


@pytest.mark.parametrize("init_values,global_pool", [(None, "token"), (0.1, "avg")])
def test_timm_vit_parity(init_values, global_pool):
  torch_model = _randomize(_timm_vit(init_values=init_values, global_pool=global_pool))
  flax_model = pretrained_vits.TimmVisionTransformer(
      10, patch_size=8, width=64, depth=2, num_heads=4, init_values=init_values,
      global_pool=global_pool)
  _assert_parity(torch_model, flax_model, _images())


@pytest.mark.parametrize("img,abs_pos", [((32, 32), False), ((32, 48), True)])
def test_timm_beit_parity(img, abs_pos):
  torch_model = _randomize(timm.models.beit.Beit(
      img_size=img, patch_size=8, embed_dim=64, depth=2, num_heads=4, use_abs_pos_emb=abs_pos,
      use_rel_pos_bias=True, init_values=0.1, num_classes=10))
  flax_model = pretrained_vits.TimmBeit(10, patch_size=8, width=64, depth=2, num_heads=4,
                                        init_values=0.1, use_abs_pos_emb=abs_pos,
                                        use_rel_pos_bias=True)
  _assert_parity(torch_model, flax_model, _images(*img))


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_relative_position_index_is_timms(grid):
  want = timm.models.beit.gen_relative_position_index(grid).numpy()
  np.testing.assert_array_equal(pretrained_vits.relative_position_index(grid), want)


def _hf_vit():
  config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, image_size=32, patch_size=8, num_labels=10)
  return _randomize(transformers.ViTForImageClassification(config))


_HF_FLAX = pretrained_vits.HFViTForImageClassification(10, width=64, depth=2, num_heads=4,
                                                        intermediate_size=128, patch_size=8)
# transformers >= 5 names -> the names of checkpoints saved by transformers 4 (the Hub's files).
_TO_V4 = [(r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
          (r"\.attention\.q_proj\.", ".attention.attention.query."),
          (r"\.attention\.k_proj\.", ".attention.attention.key."),
          (r"\.attention\.v_proj\.", ".attention.attention.value."),
          (r"\.attention\.o_proj\.", ".attention.output.dense."),
          (r"\.mlp\.fc1\.", ".intermediate.dense."), (r"\.mlp\.fc2\.", ".output.dense.")]


def _v4_name(name):
  for pattern, replacement in _TO_V4:
    name = re.sub(pattern, replacement, name)
  return name


def test_hf_vit_parity():
  _assert_parity(_hf_vit(), _HF_FLAX, _images())


def test_hf_vit_parity_with_transformers4_names():
  torch_model = _hf_vit()
  sd = {_v4_name(k): v for k, v in _state_dict(torch_model).items()}
  assert "vit.encoder.layer.1.attention.output.dense.weight" in sd
  sd["vit.pooler.dense.weight"] = np.zeros((64, 64), np.float32)   # unused by the classifier
  _assert_parity(torch_model, _HF_FLAX, _images(), state_dict=sd)


def test_to_torch_inverts_import():
  torch_model = _randomize(_timm_vit(init_values=0.1))
  sd = _state_dict(torch_model)
  params = pretrained_import.load_params(sd, pretrained_vits.TimmVisionTransformer(
      10, patch_size=8, width=64, depth=2, num_heads=4, init_values=0.1),
                                         jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  back = pretrained_import.to_torch(params)
  assert sorted(back) == sorted(sd)
  for name, value in sd.items():
    np.testing.assert_array_equal(back[name], value)


def _meta_state_dict(build):
  """Names and shapes of a full-size torch model, as zero-stride numpy views (no memory)."""
  with torch.device("meta"):
    model = build()
  return model, {k: np.broadcast_to(np.float32(0), tuple(v.shape))
                 for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,build,count", [
    ("beit_large_patch16_512",
     lambda: timm.create_model("beit_large_patch16_512", pretrained=False), 305_674_728),
    ("hf_vit_b16_cifar10",
     lambda: transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=10)),
     85_806_346),
])
def test_full_size_counts_and_every_key_maps(name, build, count):
  clf = pretrained_classifiers.pretrained_classifier(name)
  model, sd = _meta_state_dict(build)
  assert sum(p.numel() for p in model.parameters()) == count
  assert clf.num_params() == count
  params = pretrained_import.from_torch(sd, clf.param_shapes(), name)   # raises on any gap
  assert len(jax.tree.leaves(params)) == len(sd)


def test_timm_vit_b16_with_10_classes_has_dds_count():
  network = pretrained_vits.TimmVisionTransformer(10)
  shapes = jax.eval_shape(network.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  with torch.device("meta"):
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
  want = sum(p.numel() for p in model.parameters())
  assert want == 85_806_346
  assert sum(x.size for x in jax.tree.leaves(shapes)) == want


def _tiny_beit_parts():
  torch_model = _randomize(timm.models.beit.Beit(
      img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, use_abs_pos_emb=False,
      use_rel_pos_bias=True, init_values=0.1, num_classes=5))
  flax_model = pretrained_vits.TimmBeit(5, patch_size=8, width=32, depth=1, num_heads=2,
                                        init_values=0.1, use_abs_pos_emb=False,
                                        use_rel_pos_bias=True)
  return torch_model, flax_model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)


def test_import_errors_name_the_first_bad_key():
  torch_model, flax_model, spec = _tiny_beit_parts()
  sd = _state_dict(torch_model)
  missing = {k: v for k, v in sd.items() if k != "blocks.0.attn.q_bias"}
  with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_bias is missing.*\(32,\)"):
    pretrained_import.load_params(missing, flax_model, spec)
  with pytest.raises(ValueError, match=r"blocks\.0\.attn\.k_bias is not a parameter of TimmBeit"):
    pretrained_import.load_params({**sd, "blocks.0.attn.k_bias": sd["blocks.0.attn.q_bias"]},
                                  flax_model, spec)
  wrong = {**sd, "head.weight": np.zeros((7, 32), np.float32)}
  with pytest.raises(ValueError, match=r"head\.weight has shape \(7, 32\), TimmBeit expects \(5, 32\)"):
    pretrained_import.load_params(wrong, flax_model, spec)
  # old BEiT checkpoints store the index buffers and a DDP prefix: both are accepted
  extra = {"module." + k: v for k, v in sd.items()}
  extra["blocks.0.attn.relative_position_index"] = np.zeros((17, 17), np.int64)
  pretrained_import.load_params(extra, flax_model, spec)


def test_reads_safetensors_and_pth_and_refuses_code(tmp_path):
  safetensors_torch = pytest.importorskip("safetensors.torch")
  torch_model, flax_model, spec = _tiny_beit_parts()
  safe, pth, evil = tmp_path / "m.safetensors", tmp_path / "m.pth", tmp_path / "evil.pth"
  safetensors_torch.save_file(torch_model.state_dict(), str(safe))
  torch.save({"model": torch_model.state_dict()}, str(pth))
  torch.save({"model": torch_model.state_dict(), "args": _Unpicklable()}, str(evil))
  from_safe = pretrained_import.load_params(str(safe), flax_model, spec)
  from_pth = pretrained_import.load_params(str(pth), flax_model, spec)
  jax.tree.map(np.testing.assert_array_equal, from_safe, from_pth)
  with pytest.raises(ValueError, match="trusted=True"):
    pretrained_import.load_params(str(evil), flax_model, spec)
  with pytest.raises(ValueError, match="must end with one of"):
    pretrained_import.read_state_dict(str(tmp_path / "m.npz"))


class _Unpicklable:
  """A class torch.load(weights_only=True) refuses to rebuild."""


def test_pixel_wrapper_is_dds_input_convention():
  """apply(params, x) on pixel [0, 1] equals the torch model fed 2x − 1, as DDS feeds x̂0."""
  torch_model = _hf_vit()
  clf = pretrained_classifiers.PretrainedClassifier(
      "tiny", _HF_FLAX, pretrained_classifiers.Preprocess(32, (0.5,) * 3, (0.5,) * 3), 10, "")
  params = clf.load(_state_dict(torch_model))
  x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  want = _torch_logits(torch_model, 2 * x - 1)
  got = np.asarray(clf.apply(params, x))
  assert np.abs(got - want).max() <= RTOL * np.abs(want).max()
  with pytest.raises(ValueError, match=r"takes images \[B, 32, 32, 3\].*resize_to"):
    clf.apply(params, x[:, :16, :16])


def test_resize_to_matches_torch_bicubic_antialias():
  x = np.random.default_rng(2).uniform(size=(1, 8, 8, 3)).astype(np.float32)
  got = np.asarray(pretrained_classifiers.resize_to(jnp.asarray(x), 28))
  want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), (28, 28),
                                         mode="bicubic", antialias=True).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_registry_preprocessing_and_errors():
  beit = pretrained_classifiers.pretrained_classifier("beit_large_patch16_512")
  assert beit.preprocess.resolution == 512 and beit.num_classes == 1000
  vit = pretrained_classifiers.pretrained_classifier("hf_vit_b16_cifar10", dtype="bfloat16")
  assert vit.preprocess.resolution == 224 and vit.network.dtype == jnp.bfloat16
  np.testing.assert_allclose(vit.preprocess.normalize(jnp.array([0.0, 0.5, 1.0])[:, None]),
                             [[-1.0] * 3, [0.0] * 3, [1.0] * 3])
  with pytest.raises(ValueError, match="classifier must be one of"):
    pretrained_classifiers.pretrained_classifier("resnet50")
  with pytest.raises(ValueError, match="dtype must be one of"):
    pretrained_classifiers.pretrained_classifier("hf_vit_b16_cifar10", dtype="float16")
