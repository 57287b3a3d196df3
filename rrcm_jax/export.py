"""Writes a run's weights under the authors' PyTorch names, as a .pth or .safetensors file.

    python -m rrcm_jax.export WORKDIR --format=torch|safetensors OUT
        [--weights=ema|online|target] [--checkpoint=last|best_clean|...]

A fine-tuning workdir gives its classifier (`base_model.*` encoder names and
`linear_head.*`, the layout of the authors' fine-tuned checkpoints; checkpoint
`--checkpoint`); a pre-training workdir gives one copy of its encoder with the
projection head (`--weights`: "ema", the default, the fixed-rate EMA model;
"online"; "target"), under the names of the authors' `nnet`/`nnet_ema`/
`target_model`. BatchNorm statistics: the online network's for "online" and
"ema" (the EMA model keeps none, `train_state.TrainState`), the target's for
"target". `--format=torch` writes `torch.save(state_dict)` (needs torch);
`--format=safetensors` writes the same tensors through the `safetensors`
package's numpy API (no torch needed). `torch_import.load_torch_checkpoint`
and `safetensors.numpy.load_file` read them back; certification takes the .pth
as `--config.torch_checkpoint`, fine-tuning as `--config.init_from`.
"""
import argparse
import sys

import jax
import numpy as np
from etils import epath

from rrcm_jax import checkpoints, classifier, models, parallel, torch_import

FORMATS = ("torch", "safetensors")
STATS = {"ema": "batch_stats", "online": "batch_stats", "target": "target_batch_stats"}


def classifier_state_dict(workdir, which="last"):
  """{torch name: numpy array} of the fine-tuned classifier in `workdir` (checkpoint `which`)."""
  mesh = parallel.make_mesh(jax.local_devices()[:1])
  _, params, _ = classifier.load_classifier(workdir, which, mesh)
  return torch_import.to_torch({"params": jax.device_get(params)}, kind="classifier")


def encoder_state_dict(workdir, weights="ema"):
  """{torch name: numpy array} of one copy of the pre-trained encoder in `workdir`."""
  if weights not in classifier.WEIGHTS:
    raise ValueError(f"--weights must be one of {sorted(classifier.WEIGHTS)}, got {weights!r}.")
  path, step = checkpoints.resolve_checkpoint(workdir, key="WORKDIR")
  config = checkpoints.read_config(path)
  model = models.rcm_encoder(config.model)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *models.sample_inputs(config.model))
  field, stats = classifier.WEIGHTS[weights], STATS[weights]
  target = {field: abstract["params"], stats: abstract["batch_stats"]}
  state, _ = checkpoints.restore_subtrees(path, "checkpoints", target, step, str(path))
  state = jax.device_get(state)
  return torch_import.to_torch({"params": state[field], "batch_stats": state[stats]},
                               kind="encoder")


def state_dict_of(workdir, weights="ema", which="last"):
  """(state dict, kind) of a fine-tuning ("classifier") or pre-training ("encoder") workdir."""
  path, _ = checkpoints.resolve_checkpoint(workdir, key="WORKDIR")
  if "task" in checkpoints.read_config(path):
    return classifier_state_dict(path, which), "classifier"
  return encoder_state_dict(workdir, weights), "encoder"


def write(state_dict, out, fmt):
  """Writes `state_dict` ({name: numpy array}) to `out` (local or gs://) in format `fmt`."""
  if fmt not in FORMATS:
    raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}.")
  arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
  if fmt == "safetensors":
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    data = st_numpy.save(arrays)
  else:
    try:
      import io  # pylint: disable=g-import-not-at-top
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError("--format=torch needs torch (`pip install -e .[torch]`); "
                       "--format=safetensors does not.") from None
    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, buffer)
    data = buffer.getvalue()
  out = epath.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(data)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m rrcm_jax.export",
                                   description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("workdir", metavar="WORKDIR", help="a pre-training or fine-tuning workdir")
  parser.add_argument("out", metavar="OUT", help="the file to write (local or gs://)")
  parser.add_argument("--format", default="torch", help=f"one of {FORMATS}")
  parser.add_argument("--weights", default="ema", help="pre-training: ema | online | target")
  parser.add_argument("--checkpoint", default="last", help="fine-tuning: last or a best_* one")
  args = parser.parse_args(argv)
  try:
    if args.format not in FORMATS:
      raise ValueError(f"--format must be one of {FORMATS}, got {args.format!r}.")
    if args.weights not in classifier.WEIGHTS:
      raise ValueError(f"--weights must be one of {sorted(classifier.WEIGHTS)}, got "
                       f"{args.weights!r}.")
    state_dict, kind = state_dict_of(args.workdir, args.weights, args.checkpoint)
    out = write(state_dict, args.out, args.format)
  except (ValueError, OSError) as e:
    parser.exit(2, f"error: {e}\n")
  print(f"wrote the {kind} ({len(state_dict)} tensors) to {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
