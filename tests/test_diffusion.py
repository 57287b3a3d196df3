"""DDS (rrcm_jax.diffusion) against the recording of the authors' code (tests/testdata/README.md).

Every setting comes from the recording's meta (U-Net constructor, schedule,
timestep convention, classifier resize), so another recording of the same
layout passes unchanged. Arrays are NCHW there, NHWC here. "Relative" errors
are max |ours − theirs| / max |theirs| per array.
"""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import reference_file
from rrcm_jax.diffusion import dds, schedules
from rrcm_jax.diffusion import torch_import as dti
from rrcm_jax.diffusion.unet import UNET_PRESETS, AttentionBlock, UNet, unet_kwargs_from_torch

RTOL = 1e-5


@pytest.fixture(scope="module")
def rec():
  data = np.load(reference_file("dds_small.npz"))
  return {k: data[k] for k in data.files} | {"meta": json.loads(bytes(data["meta"]))}


@pytest.fixture(scope="module")
def unet(rec):
  """(module, variables, jitted apply) built from the recording's constructor and weights."""
  module = UNet(**unet_kwargs_from_torch(rec["meta"]["unet_constructor"]))
  state_dict = {k[len("sd/"):]: v for k, v in rec.items() if k.startswith("sd/")}
  return module, dti.unet_variables_from_torch(state_dict, module), jax.jit(module.apply)


def _nhwc(a):
  return np.moveaxis(np.asarray(a), -3, -1)


def _assert_close(actual, expected, rtol=RTOL):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  err = np.abs(actual - expected).max() / np.abs(expected).max()
  assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def _schedule(meta):
  return meta["noise_schedule"], meta["diffusion_steps"], meta["diffusion"]["rescale_timesteps"]


def _step(rec, sigma):
  return dds.dds_step(float(sigma), *_schedule(rec["meta"]))


def test_schedule_matches_recording(rec):
  name, steps, _ = _schedule(rec["meta"])
  # Their object re-derives β_t = 1 − ᾱ_t/ᾱ_{t−1} (respacing), hence rounding-level differences.
  np.testing.assert_allclose(schedules.betas(name, steps), rec["betas"], rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(schedules.alphas_cumprod(name, steps), rec["alphas_cumprod"],
                             rtol=1e-12)


def test_dds_timestep_and_added_noise_match_recording(rec):
  name, steps, rescale = _schedule(rec["meta"])
  alpha_bar = schedules.alphas_cumprod(name, steps)
  t_star = [schedules.dds_timestep(float(s), alpha_bar) for s in rec["dds_sigmas"]]
  assert t_star == rec["dds_t"].tolist() == rec["meta"]["t_star"]
  np.testing.assert_allclose(schedules.noise_to_signal(alpha_bar[t_star]), rec["dds_real_sigma"],
                             rtol=1e-12)
  added = [dds.dds_step(float(s), name, steps, rescale).sigma_added for s in rec["dds_sigmas"]]
  np.testing.assert_allclose(added, rec["dds_real_sigma"] / 2, rtol=1e-12)
  assert all(a >= s for a, s in zip(added, rec["dds_sigmas"]))   # rounded up, never down
  np.testing.assert_array_equal(schedules.model_timesteps(rec["unet_t"], steps, rescale),
                                rec["unet_t_in"])
  for t, t_in in zip(t_star, rec["dds_t_in"]):
    np.testing.assert_array_equal(np.full_like(t_in, schedules.model_timesteps(t, steps, rescale)),
                                  t_in)


def test_linear_schedule_timesteps_of_the_imagenet_denoiser():
  # The authors' ImageNet path (linear, 1000 steps): t* and added pixel-space noise for σ = 0.25,
  # 0.5, 1.0 as tests/testdata/README.md lists them.
  alpha_bar = schedules.alphas_cumprod("linear", 1000)
  assert [schedules.dds_timestep(s, alpha_bar) for s in (0.25, 0.5, 1.0)] == [145, 259, 396]
  np.testing.assert_allclose([schedules.dds_sigma_added(s, alpha_bar) for s in (0.25, 0.5, 1.0)],
                             [0.251581, 0.502392, 1.000241], atol=1e-6)
  assert schedules.model_timesteps(145, 1000, False) == np.float32(145)


def test_dds_timestep_rejects_unreachable_and_invalid_sigma(rec):
  alpha_bar = rec["alphas_cumprod"]
  largest = schedules.noise_to_signal(alpha_bar[-1]) / 2   # pixel space
  assert schedules.dds_timestep(largest, alpha_bar) == len(alpha_bar) - 1
  with pytest.raises(ValueError, match="exceeds the schedule's largest"):
    schedules.dds_timestep(largest * 1.001, alpha_bar)
  for bad in (0.0, -0.5, float("nan")):
    with pytest.raises(ValueError, match="sigma must be"):
      schedules.dds_timestep(bad, alpha_bar)
  with pytest.raises(ValueError, match="noise_schedule must be one of"):
    schedules.betas("quadratic", 1000)


def test_unet_matches_recording(rec, unet):
  _, variables, apply = unet
  out = apply(variables, _nhwc(rec["unet_x"]), rec["unet_t_in"])
  _assert_close(out, _nhwc(rec["unet_out"]))


def test_dds_steps_match_recording(rec, unet):
  module, variables, apply = unet
  for i, sigma in enumerate(rec["dds_sigmas"]):
    step = _step(rec, sigma)
    x_t = dds.noisy_x_t(_nhwc(rec["dds_x"]), _nhwc(rec["dds_noise"][i]), step)
    _assert_close(x_t, _nhwc(rec["dds_x_t"][i]))
    t_in = jnp.full((x_t.shape[0],), step.t_in, jnp.float32)
    out = apply(variables, _nhwc(rec["dds_x_t"][i]), t_in)
    _assert_close(out, _nhwc(rec["dds_model_out"][i]))
    channels = x_t.shape[-1]
    # The formula on their ε̂, then ours end to end.
    x0_formula = dds.predict_x0(_nhwc(rec["dds_x_t"][i]), _nhwc(rec["dds_model_out"][i])[..., :channels],
                                step, clip=False)
    _assert_close(x0_formula, _nhwc(rec["dds_x0_unclipped"][i]))
    _assert_close(dds.predict_x0(x_t, out[..., :channels], step, clip=False),
                  _nhwc(rec["dds_x0_unclipped"][i]))
    _assert_close(dds.denoise(module, variables, x_t, step), _nhwc(rec["dds_x0"][i]))


def _recorded_classifier_sample(meta):
  match = re.search(r"sigma index (\d+), image (\d+)", meta["classifier_resize"]["recorded"])
  return int(match.group(1)), int(match.group(2))


def test_classifier_input_matches_recording(rec):
  resize = rec["meta"]["classifier_resize"]
  assert (resize["mode"], resize["antialias"]) == ("bicubic", True)
  i, j = _recorded_classifier_sample(rec["meta"])
  x0 = jnp.asarray(_nhwc(rec["dds_x0"][i][j:j + 1]))
  _assert_close(dds.resize_for_classifier(x0, resize["size"]), _nhwc(rec["dds_classifier_in"]))


def test_logits_fn_end_to_end(rec, unet):
  module, variables, _ = unet
  i, j = _recorded_classifier_sample(rec["meta"])
  size = rec["meta"]["classifier_resize"]["size"]
  weights = jax.random.normal(jax.random.key(0), (size * size * 3, 10)) / size

  def classifier_fn(w, x):   # a linear stand-in: any classifier of [b, S, S, C] model space
    return x.reshape(x.shape[0], -1) @ w

  logits_fn = jax.jit(dds.make_logits_fn(module, classifier_fn, _step(rec, rec["dds_sigmas"][i]),
                                         size))
  logits = logits_fn({"denoiser": variables, "classifier": weights},
                     _nhwc(rec["dds_x"][j:j + 1]), _nhwc(rec["dds_noise"][i][j:j + 1]))
  _assert_close(logits, classifier_fn(weights, _nhwc(rec["dds_classifier_in"])))


def test_model_space_draw_maps_to_x_t(rec):
  # A sampler that adds σ' = sigma_added in pixel space and maps to model space gives x_t / √ᾱ.
  for i, sigma in enumerate(rec["dds_sigmas"]):
    step = _step(rec, sigma)
    x_model = (_nhwc(rec["dds_x"]) + step.sigma_added * _nhwc(rec["dds_noise"][i]) - 0.5) / 0.5
    _assert_close(dds.x_t_from_model_input(x_model, step), _nhwc(rec["dds_x_t"][i]), rtol=1e-6)


@pytest.mark.parametrize("name, size, count", [("cifar10_uncond_50M_500K", 32, 52_546_438),
                                               ("256x256_diffusion_uncond", 256, 552_814_086)])
def test_public_denoiser_parameter_counts(name, size, count):
  module = UNet(**UNET_PRESETS[name])
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.float32))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count
  assert dds.DDS_PRESETS[name]["image_size"] == size


def test_imagenet_denoiser_runs_below_its_training_resolution():
  # DDS runs the 256×256 model on 224×224 crops (attention at 28, 14, 7 px).
  module, step = dds.preset_unet_and_step("256x256_diffusion_uncond", 0.5)
  assert (step.t, step.t_in) == (259, 259.0)
  out = jax.eval_shape(lambda: module.apply(
      module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), jnp.zeros((1,))),
      jnp.zeros((1, 224, 224, 3)), jnp.zeros((1,))))
  assert out.shape == (1, 224, 224, 6)


def _attention_reference(x, w, b, heads, new_order):
  """The torch formula in numpy on [C, T]: qkv = W x + b, split heads/q,k,v in torch's order."""
  c, t = x.shape
  ch = c // heads
  mean = x.reshape(32, -1).mean(1, keepdims=True)
  var = x.reshape(32, -1).var(1, keepdims=True)
  qkv = w @ ((x.reshape(32, -1) - mean) / np.sqrt(var + 1e-5)).reshape(c, t) + b[:, None]
  if new_order:
    q, k, v = (a.reshape(heads, ch, t) for a in np.split(qkv, 3))
  else:
    q, k, v = np.split(qkv.reshape(heads, 3 * ch, t), 3, axis=1)
  logits = np.einsum("hct,hcs->hts", q, k) / np.sqrt(ch)
  weight = np.exp(logits - logits.max(-1, keepdims=True))
  weight /= weight.sum(-1, keepdims=True)
  return np.einsum("hts,hcs->hct", weight, v).reshape(c, t)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_head_orders(new_order):
  c, heads, side = 64, 4, 4
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, side, side, c)).astype(np.float32)
  w = rng.normal(size=(3 * c, c)).astype(np.float32) / 8
  b = rng.normal(size=(3 * c,)).astype(np.float32)
  eye = np.eye(c, dtype=np.float32)
  params = {"norm": {"scale": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)},
            "qkv": {"kernel": w.T, "bias": b},
            "proj_out": {"kernel": eye, "bias": np.zeros(c, np.float32)}}   # h = attention
  out = AttentionBlock(heads, new_order).apply({"params": params}, x)
  tokens = x.reshape(side * side, c).T
  expected = tokens + _attention_reference(tokens.astype(np.float64), w, b, heads, new_order)
  _assert_close(np.asarray(out).reshape(side * side, c).T, expected)
  other = _attention_reference(tokens.astype(np.float64), w, b, heads, not new_order)
  assert np.abs(np.asarray(out).reshape(side * side, c).T - tokens - other).max() > 1e-2


def test_state_dict_round_trip_and_errors(rec, unet):
  module, variables, _ = unet
  state_dict = {k[len("sd/"):]: v for k, v in rec.items() if k.startswith("sd/")}
  back = dti.unet_variables_to_torch(variables)
  assert back.keys() == state_dict.keys()
  assert all(np.array_equal(back[k], state_dict[k]) for k in state_dict)
  prefixed = {"module." + k: v for k, v in state_dict.items()}
  assert jax.tree.all(jax.tree.map(np.array_equal, dti.unet_variables_from_torch(prefixed, module),
                                   variables))
  with pytest.raises(ValueError, match=r"missing key out\.2\.bias"):
    dti.unet_variables_from_torch({k: v for k, v in state_dict.items() if k != "out.2.bias"},
                                  module)
  with pytest.raises(ValueError, match=r"unexpected key input_blocks\.9\.0\.op\.weight"):
    dti.unet_variables_from_torch(state_dict | {"input_blocks.9.0.op.weight": np.zeros((1, 1, 3, 3))},
                                  module)
  with pytest.raises(ValueError, match=r"out\.2\.weight has shape \(3, 32, 3, 3\)"):
    dti.unet_variables_from_torch(state_dict | {"out.2.weight": state_dict["out.2.weight"][:3]},
                                  module)


def test_unet_constructor_errors():
  with pytest.raises(ValueError, match="class-conditional"):
    unet_kwargs_from_torch({"num_classes": 1000})
  with pytest.raises(ValueError, match="unknown U-Net constructor arguments"):
    unet_kwargs_from_torch({"model_channels": 32, "num_heads_channels": 64})
  with pytest.raises(ValueError, match="unknown DDS denoiser"):
    dds.preset_unet_and_step("cifar10", 0.25)
