"""Weights in and out: fine-tuning from the authors' pre-training .pth (classifier.torch_encoder)
and `python -m rrcm_jax.export` of a classifier or an encoder, in torch and safetensors
formats, read back to the same logits."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from rrcm_jax import classifier, denoiser, export, models, torch_import
from test_finetune import ONE, _abstract_params, pretrain_dir, tiny_config  # noqa: F401  (fixture)
from test_finetune import tiny_pretrain_config

torch = pytest.importorskip("torch")
st_numpy = pytest.importorskip("safetensors.numpy")
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _read(path, fmt):
  if fmt == "safetensors":
    return st_numpy.load_file(str(path))
  return torch_import.load_torch_checkpoint(str(path))


def _logits(model, variables, config):
  x = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  return np.asarray(denoiser.encode_at_sigma(model.apply, variables, x, 0.5))


def _random_encoder_state_dict(seed):
  """An encoder state dict in the authors' names for the tiny pre-training model."""
  cfg = tiny_pretrain_config().model
  encoder = models.rcm_encoder(cfg)
  variables = encoder.init(jax.random.key(seed), *models.sample_inputs(cfg))
  return torch_import.to_torch(jax.device_get(variables), kind="encoder")


def test_finetuning_starts_from_the_authors_pretraining_pth(tmp_path):
  networks = {"nnet": _random_encoder_state_dict(1), "nnet_ema": _random_encoder_state_dict(2),
              "target_model": _random_encoder_state_dict(3)}
  path = tmp_path / "nnet.pth"
  torch.save({name: {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
              for name, sd in networks.items()} | {"step": 7}, path)
  for weights, network in classifier.TORCH_NETWORKS.items():
    config = tiny_config(init_from=str(path), init_weights=weights)
    overrides, info = classifier.initial_params(config, _abstract_params(config))
    expected = torch_import.from_torch(networks[network], "encoder")["params"]["vit"]
    assert jax.tree.structure(overrides["vit"]) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(overrides["vit"]), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(np.asarray(a), b)
    assert info["num_scales"] == classifier.TORCH_NUM_SCALES


def test_pth_of_another_architecture_is_one_sentence(tmp_path):
  sd = _random_encoder_state_dict(0)
  sd["blocks.0.mlp.fc1.weight"] = sd["blocks.0.mlp.fc1.weight"][:-1]
  path = tmp_path / "bad.pth"
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
  config = tiny_config(init_from=str(path))
  with pytest.raises(ValueError, match="blocks.0.mlp.fc1.weight has shape"):
    classifier.initial_params(config, _abstract_params(config))


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("weights", ["online", "ema", "target"])
def test_encoder_export_round_trip(pretrain_dir, tmp_path, fmt, weights):  # noqa: F811
  out = tmp_path / f"encoder.{fmt}"
  state_dict, kind = export.state_dict_of(str(pretrain_dir), weights)
  export.write(state_dict, out, fmt)
  assert kind == "encoder" and "projection_head.1.running_var" in state_dict
  cfg = tiny_pretrain_config().model
  encoder = models.rcm_encoder(cfg)
  back = torch_import.load_variables(_read(out, fmt), encoder, models.sample_inputs(cfg))
  # the workdir's copy through the path fine-tuning reads it
  vit, _ = classifier.load_pretrained_encoder(
      tiny_config(init_from=str(pretrain_dir), init_weights=weights),
      _abstract_params(tiny_config()))
  for a, b in zip(jax.tree.leaves(back["params"]["vit"]), jax.tree.leaves(vit)):
    np.testing.assert_array_equal(a, np.asarray(b))


@pytest.fixture(scope="module")
def finetune_dir(pretrain_dir, tmp_path_factory):  # noqa: F811
  from rrcm_jax import finetune  # pylint: disable=g-import-not-at-top
  from test_finetune import ArrayData  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("finetune")
  config = tiny_config(task="finetune", epochs=1, init_from=str(pretrain_dir), train_head=True)
  finetune.train(config, str(workdir), data=ArrayData(), mesh=ONE())
  return workdir


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_classifier_export_round_trip_gives_identical_logits(finetune_dir, tmp_path, fmt):
  out = tmp_path / f"classifier.{fmt}"
  state_dict, kind = export.state_dict_of(str(finetune_dir))
  export.write(state_dict, out, fmt)
  assert kind == "classifier" and "linear_head.weight" in state_dict
  model, params, info = classifier.load_classifier(finetune_dir, "last", ONE())
  back = torch_import.load_variables(_read(out, fmt), model, models.sample_inputs(info["model"]),
                                     kind="classifier")
  config = tiny_config()
  np.testing.assert_array_equal(_logits(model, back, config),
                                _logits(model, {"params": params}, config))


@pytest.mark.slow
def test_export_cli(finetune_dir, tmp_path):
  out = tmp_path / "c.safetensors"
  run = subprocess.run([sys.executable, "-m", "rrcm_jax.export", str(finetune_dir), str(out),
                        "--format=safetensors"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr
  assert "linear_head.weight" in st_numpy.load_file(str(out))
  bad = subprocess.run([sys.executable, "-m", "rrcm_jax.export", str(finetune_dir), str(out),
                        "--format=onnx"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "--format must be one of" in bad.stderr
