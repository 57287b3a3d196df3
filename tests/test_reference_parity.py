"""Number-for-number parity with the authors' PyTorch code.

`rrcm_small.npz` (tests/testdata/README.md) holds outputs of the authors'
modules on random weights, float32, CPU. Every setting (model sizes, grid,
temperature, σ_data, noise levels of the fine-tuned logits) is read from the
file itself, so another recording with the same keys passes unchanged. Their weights go
through `rrcm_jax.torch_import`, their NCHW images are transposed to NHWC,
and every array must agree to 1e-5 relative (‖ours − theirs‖ / ‖theirs‖).

One subtlety of the recording: the state dicts were saved at the end of the
script, after the encoder call and the four online calls of the loss, each of
which updated the BatchNorm running statistics in torch's way (momentum 0.1,
unbiased variance). `enc_proj_eval` was computed right after the encoder
call, so the test rewinds the four loss-call updates to recover the running
statistics it used (`_rewind_running_stats`).
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import reference_file
from configs import common
from rrcm_jax import denoiser
from rrcm_jax import losses
from rrcm_jax import models
from rrcm_jax import torch_import

REFERENCE = reference_file("rrcm_small.npz")
RTOL = 1e-5
TORCH_MOMENTUM = 0.1
# The fine-tuned logits are conditioned on an 81-point grid (the paper's checkpoints);
# a recording that used another grid says so in meta["ft_num_scales"].
DEFAULT_FT_NUM_SCALES = 81
_FT_KEY = re.compile(r"ft_logits_ln([01])_s([0-9.]+)$")


def assert_matches(got, want, name):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  max_abs = np.max(np.abs(got - want))
  assert rel <= RTOL, f"{name}: relative error {rel:.3g} > {RTOL}"
  assert max_abs <= RTOL * np.max(np.abs(want)), f"{name}: max abs error {max_abs:.3g}"


@pytest.fixture(scope="session")
def reference():
  assert os.path.exists(REFERENCE), f"{REFERENCE} is missing (set RRCM_REFERENCE_DIR)."
  with np.load(REFERENCE) as data:
    arrays = {k: data[k] for k in data.files}
  arrays["meta"] = json.loads(bytes(arrays["meta"]))
  return arrays


def _ft_names():
  """Keys of the recorded fine-tuned logits (read at collection, before the fixtures)."""
  with np.load(REFERENCE) as data:
    return sorted(k for k in data.files if _FT_KEY.match(k))


def _ft_levels(reference):
  """Model-space noise levels s of the recorded fine-tuned logits, sorted."""
  return sorted({float(_FT_KEY.match(k).group(2)) for k in reference if _FT_KEY.match(k)})


def _state_dict(reference, prefix):
  return {k[len(prefix):]: v for k, v in reference.items() if k.startswith(prefix)}


def _nhwc(images):
  return jnp.asarray(np.transpose(images, (0, 2, 3, 1)))


@pytest.fixture(scope="module")
def model_cfg(reference):
  c = reference["meta"]["cfg"]
  assert not c["qkv_bias"]
  assert reference["meta"]["sigma_data"] == common.denoiser_config().sigma_data
  assert reference["enc_x_t"].shape[0] == reference["meta"]["batch"]
  cfg = common.model_config(width=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"],
                            patch_size=c["patch_size"], image_size=c["image_size"], channels=3,
                            proj_hidden=c["hidden_dim"], proj_out=c["output_dim"])
  cfg.mlp_ratio = c["mlp_ratio"]
  return cfg


@pytest.fixture(scope="module")
def encoder(model_cfg):
  return models.rcm_encoder(model_cfg)


@pytest.fixture(scope="module")
def online(reference, encoder):
  inputs = (_nhwc(reference["enc_x_t"]), jnp.asarray(reference["enc_sigmas"]))
  return torch_import.load_variables(_state_dict(reference, "sd/"), encoder, inputs, "encoder")


@pytest.fixture(scope="module")
def encode_train(encoder):
  """(variables, x_noisy, σ) -> (z, h, batch_stats after flax's update), training mode."""
  @jax.jit
  def fn(variables, x, sigma):
    (z, h), updates = denoiser.encode_at_sigma(encoder.apply, variables, x, sigma, train=True,
                                               mutable=["batch_stats"])
    return z, h, updates["batch_stats"]
  return fn


@pytest.fixture(scope="module")
def encode_eval(encoder):
  """(variables, x_noisy, σ) -> (z, h), BatchNorm on the running statistics."""
  return jax.jit(lambda v, x, s: denoiser.encode_at_sigma(encoder.apply, v, x, s, train=False))


def _loss_inputs(reference):
  views = {"x": _nhwc(reference["loss_x_start"]), "a1": _nhwc(reference["loss_x_aug"]),
           "a2": _nhwc(reference["loss_x_aug2"])}
  return views, _nhwc(reference["loss_noise"])


def _rewind_running_stats(final, batch_updates, batch_size):
  """Torch running stats before some train-mode calls, from those after them.

  torch: S ← (1 − m)·S + m·(mean, unbiased var). `batch_updates` are the
  batch statistics of each call as our BatchNorm reports them after one
  update from zero statistics: (m·mean, m·unbiased var), the same rule.
  """
  del batch_size   # models.BatchNorm already keeps torch's unbiased variance
  stats = final
  for update in reversed(batch_updates):
    stats = {bn: {k: (stats[bn][k] - update[bn][k]) / (1 - TORCH_MOMENTUM)
                  for k in ("mean", "var")} for bn in stats}
  return stats


@pytest.fixture(scope="module")
def encoder_outputs(reference, online, encode_train, encode_eval):
  x, sigmas = _nhwc(reference["enc_x_t"]), jnp.asarray(reference["enc_sigmas"])
  z_train, h_train, _ = encode_train(online, x, sigmas)

  # Batch statistics of the four online loss calls, in the reference's order.
  zero = jax.tree.map(jnp.zeros_like, online["batch_stats"])
  views, noise = _loss_inputs(reference)
  num_scales, index = reference["meta"]["num_scales"], reference["meta"]["index"]
  sigma, sigma_next, sigma_min = (denoiser.karras_sigma(i, num_scales)
                                  for i in (index, index + 1, num_scales - 1))
  updates = []
  for view, level in ((views["a1"], sigma_min), (views["a2"], sigma_min),
                      (views["x"], sigma), (views["x"], sigma_next)):
    stats = encode_train({"params": online["params"], "batch_stats": zero},
                         view + level * noise, level)[2]
    updates.append(jax.tree.map(np.asarray, stats["projection_head"]))
  running = _rewind_running_stats(online["batch_stats"]["projection_head"], updates, x.shape[0])
  eval_vars = {"params": online["params"], "batch_stats": {"projection_head": running}}
  z_eval, h_eval = encode_eval(eval_vars, x, sigmas)
  return {"enc_proj_train": z_train, "enc_feat_train": h_train,
          "enc_proj_eval": z_eval, "enc_feat_eval": h_eval}


@pytest.mark.parametrize("name", ["enc_proj_train", "enc_feat_train", "enc_proj_eval",
                                  "enc_feat_eval"])
def test_encoder_outputs(reference, encoder_outputs, name):
  assert_matches(encoder_outputs[name], reference[name], name)


def test_saved_running_stats_are_not_the_eval_ones(reference, online, encode_eval):
  """Guards the rewind above: with the saved statistics the projection differs."""
  x, sigmas = _nhwc(reference["enc_x_t"]), jnp.asarray(reference["enc_sigmas"])
  z, _ = encode_eval(online, x, sigmas)
  rel = np.linalg.norm(np.asarray(z) - reference["enc_proj_eval"])
  assert rel / np.linalg.norm(reference["enc_proj_eval"]) > 0.01


@pytest.fixture(scope="module")
def loss_outputs(reference, encoder, online):
  target = torch_import.from_torch(_state_dict(reference, "target_sd/"), "encoder")
  views, noise = _loss_inputs(reference)
  meta = reference["meta"]

  @jax.jit
  def loss_and_grad(params, target, batch_stats, views, noise):
    fn = lambda p: losses.pretrain_loss(
        p, target["params"], batch_stats, target["batch_stats"], views, noise,
        meta["index"], meta["num_scales"], apply_fn=encoder.apply,
        denoiser_cfg=common.denoiser_config(), temperature=meta["tau"])
    return jax.value_and_grad(fn, has_aux=True)(params)

  (loss, aux), grads = loss_and_grad(online["params"], target, online["batch_stats"], views, noise)
  grad_norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                          for g in jax.tree.leaves(grads)))
  return {"loss_contrast": aux["contrast"], "loss_consistency": aux["consistency"],
          "loss_per_example": aux["contrast"] + aux["consistency"], "loss_mean": loss,
          "loss_grad_norm": grad_norm}


@pytest.mark.parametrize("name", ["loss_contrast", "loss_consistency", "loss_per_example",
                                  "loss_mean", "loss_grad_norm"])
def test_pretrain_loss(reference, loss_outputs, name):
  assert_matches(loss_outputs[name], reference[name], name)


@pytest.fixture(scope="module")
def finetune_logits(reference, model_cfg):
  """All four noise levels in one batch of 4·B images, each at its own grid σ."""
  x, noise = _nhwc(reference["loss_x_start"]), _nhwc(reference["loss_noise"])
  batch, levels = x.shape[0], _ft_levels(reference)
  num_scales = reference["meta"].get("ft_num_scales", DEFAULT_FT_NUM_SCALES)
  inputs = jnp.concatenate([x + s * noise for s in levels])
  # σ_j one scalar at a time, as fine-tuning computes its constant: float32 x**7 of a
  # vector rounds differently (σ_42 moves by 7e-7, τ by 2e-4, the logits by 4e-6).
  grid = [denoiser.nearest_grid_index(s, num_scales) for s in levels]
  sigmas = jnp.repeat(jnp.stack([denoiser.karras_sigma(j, num_scales) for j in grid]), batch)
  logits = {}
  for ln in (0, 1):
    head = reference[f"ft_ln{ln}_sd/linear_head.weight"]
    model = models.classifier(model_cfg, num_classes=head.shape[0], final_norm=bool(ln))
    variables = torch_import.load_variables(_state_dict(reference, f"ft_ln{ln}_sd/"), model,
                                            (inputs, sigmas), "classifier")
    out = jax.jit(lambda v, x, s, m=model: denoiser.encode_at_sigma(m.apply, v, x, s))(
        variables, inputs, sigmas)
    for k, s in enumerate(levels):
      logits[f"ft_logits_ln{ln}_s{s}"] = out[k * batch:(k + 1) * batch]
  return logits


@pytest.mark.parametrize("name", _ft_names())
def test_finetuned_logits(reference, finetune_logits, name):
  assert_matches(finetune_logits[name], reference[name], name)
