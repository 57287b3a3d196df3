"""The encoder: pinned parameter counts of the paper's models, dtypes, options."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from rrcm_jax import models, optim


def _variables(cfg, batch=2):
  model = models.rcm_encoder(cfg)
  return model, jax.eval_shape(
      lambda: model.init(jax.random.key(0), *models.sample_inputs(cfg, batch), train=True))


@pytest.mark.parametrize("kw,hidden,frozen,total,trainable,encoder,head", [
    (dict(width=768, depth=12, num_heads=12, patch_size=4, image_size=32), 2048, False,
     91_417_088, 91_417_088, 85_117_440, 6_299_648),
    (dict(width=768, depth=12, num_heads=12, patch_size=16, image_size=224), 4096, True,
     106_759_680, 106_169_088, None, None),
    (dict(width=512, depth=6, num_heads=8, patch_size=16, image_size=224), 2048, True,
     25_177_088, 24_783_360, None, None),
])
def test_parameter_counts_equal_the_authors_models(kw, hidden, frozen, total, trainable,
                                                   encoder, head):
  cfg = common.model_config(proj_hidden=hidden, **kw)
  cfg.frozen_patch_embed = frozen
  _, variables = _variables(cfg)
  params = variables["params"]
  assert models.count_params(params) == total
  assert models.count_params(params, exclude_patch_embed=frozen) == trainable
  if encoder is not None:
    assert models.count_params(params["vit"]) == encoder
    assert models.count_params(params["projection_head"]) == head


def test_paper_configs_build_the_pinned_models():
  from configs import cifar10_pretrain_rcmb, imagenet_pretrain_rcmb, imagenet_pretrain_rcms
  for mod, total in [(cifar10_pretrain_rcmb, 91_417_088), (imagenet_pretrain_rcmb, 106_759_680),
                     (imagenet_pretrain_rcms, 25_177_088)]:
    _, variables = _variables(mod.get_config().model)
    assert models.count_params(variables["params"]) == total


def _tiny(**overrides):
  cfg = common.model_config(width=32, depth=1, num_heads=2, patch_size=4, image_size=8,
                            channels=3, proj_hidden=16, proj_out=8)
  cfg.update(overrides)
  return cfg


def test_time_mlp_adds_its_parameters():
  base = models.count_params(_variables(_tiny())[1]["params"])
  with_mlp = models.count_params(_variables(_tiny(time_mlp=True))[1]["params"])
  d = 32
  assert with_mlp - base == d * 4 * d + 4 * d + 4 * d * d + d


def test_bfloat16_compute_keeps_float32_params_and_outputs_close():
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  t = jnp.linspace(-1000, 1000, 4)
  f32 = models.rcm_encoder(_tiny())
  variables = f32.init(jax.random.key(0), x, t, train=True)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  bf16 = models.rcm_encoder(_tiny(dtype="bfloat16"))
  (z32, h32), _ = f32.apply(variables, x, t, train=True, mutable=["batch_stats"])
  (z16, h16), _ = bf16.apply(variables, x, t, train=True, mutable=["batch_stats"])
  assert z16.dtype == jnp.float32 and h16.dtype == jnp.float32
  assert np.linalg.norm(h16 - h32) / np.linalg.norm(h32) < 3e-2


def test_mocov3_init_bounds():
  cfg = _tiny(init="mocov3", width=48, num_heads=3)
  params = models.rcm_encoder(cfg).init(jax.random.key(0), *models.sample_inputs(cfg),
                                        train=True)["params"]
  qkv = params["vit"]["blocks_0"]["attn"]["qkv"]["kernel"]
  fc1 = params["vit"]["blocks_0"]["fc1"]["kernel"]
  patch = params["vit"]["patch_embed"]["kernel"]
  assert np.abs(qkv).max() <= np.sqrt(6 / (2 * 48)) and np.abs(qkv).max() > 0.9 * np.sqrt(6 / 96)
  assert np.abs(fc1).max() <= np.sqrt(6 / (48 + 192))
  assert np.abs(patch).max() <= np.sqrt(6 / (3 * 16 + 48))
  assert float(np.abs(params["vit"]["blocks_0"]["fc1"]["bias"]).max()) == 0.0


def test_frozen_patch_embedding_gets_no_gradient_and_no_update():
  cfg = _tiny(frozen_patch_embed=True)
  model = models.rcm_encoder(cfg)
  x, t = jax.random.normal(jax.random.key(1), (4, 8, 8, 3)), jnp.zeros((4,))
  variables = model.init(jax.random.key(0), x, t, train=True)

  def loss(p):
    (z, h), _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, t,
                            train=True, mutable=["batch_stats"])
    return jnp.sum(z ** 2) + jnp.sum(h)

  grads = jax.grad(loss)(variables["params"])
  assert float(optax.tree.norm(grads["vit"]["patch_embed"])) == 0.0
  assert float(optax.tree.norm(grads["vit"]["blocks_0"])) > 0.0
  config = pretrain_config_for(cfg)
  tx = optim.pretrain_optimizer(config)
  opt_state = tx.init(variables["params"])
  grads = jax.tree.map(jnp.ones_like, variables["params"])   # weight decay too must not touch it
  for _ in range(3):
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
  assert float(optax.tree.norm(updates["vit"]["patch_embed"])) == 0.0
  assert float(optax.tree.norm(updates["vit"]["blocks_0"])) > 0.0


def pretrain_config_for(model_cfg):
  config = common.pretrain_config(total_steps=10, batch_size=8, lr=1e-3, weight_decay=0.1,
                                  warmup_divisor=5, ema_rate=0.9, target_ema_A=15)
  config.model = model_cfg
  return config


@pytest.mark.parametrize("overrides,match", [
    (dict(patch_size=3), "patch_size=3 must divide model.image_size=8"),
    (dict(num_heads=3), "num_heads=3 must divide model.width=32"),
    (dict(dtype="float16"), "model.dtype must be one of"),
    (dict(init="kaiming"), "model.init must be"),
])
def test_impossible_model_configs_are_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    models.validate_model_config(_tiny(**overrides))
