"""Where the replication's images come from: the Fashion-MNIST IDX files (every stage on the
device pipeline, no TensorFlow anywhere: rrcm_jax/data/arrays.py) or TFDS (after the offline
preparation, `python -m rrcm_jax.data.prepare fashion_mnist`).

`experiments.replication --arrays DIR` names the IDX folder (config data.arrays of every
stage); without it the Debian package dataset-fashion-mnist's folder is used when installed,
else TFDS.
"""
import os
import subprocess
import sys

from configs import fashion_mnist_replication as rep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDX_FILES = ("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
             "and t10k-labels-idx1-ubyte.gz")


def data_overrides(args):
  """The --config overrides of the data that every stage but the preparation reads."""
  if args.data != "fashion_mnist":
    return [f"--config.data.name={args.data}"]
  arrays = getattr(args, "arrays", None)
  return [] if arrays is None else [f"--config.data.arrays={arrays}"]


def data_source(args):
  """(pipeline, source kind, path) of the training stages' data: ("device", "idx", folder)
  when the IDX files are found (--arrays, else Debian's dataset-fashion-mnist), pipeline
  "tfdata" if any stage resolves to tf.data; the kind is `arrays.source_of`'s ("tfds" when
  nothing else is found). ValueError (one sentence) for an --arrays that holds no dataset."""
  from rrcm_jax.data import arrays as arrays_lib  # pylint: disable=g-import-not-at-top
  from rrcm_jax.data import device  # pylint: disable=g-import-not-at-top
  configs = [rep.get_config(rep.config_arg("pretrain", quick=args.quick))]
  configs += [rep.get_config(rep.config_arg(m, args.sigmas[0], args.quick)) for m in rep.METHODS]
  for config in configs:
    config.data.arrays = getattr(args, "arrays", None)
  pipelines = {device.resolve_pipeline(c).data.pipeline for c in configs}
  kind, path = arrays_lib.source_of(configs[0].data)
  return ("tfdata" if "tfdata" in pipelines else "device"), kind, path


def reads_tfds(args):
  """Whether Fashion-MNIST is read through TFDS (no IDX files, or a stage on tf.data), so
  that `python -m rrcm_jax.data.prepare fashion_mnist` runs first."""
  if args.data != "fashion_mnist":
    return False
  pipeline, kind, _ = data_source(args)
  return pipeline == "tfdata" or kind == "tfds"


def tfds_importable():
  """Whether TensorFlow Datasets imports (in a child process: TensorFlow stays out of this one)."""
  probe = subprocess.run([sys.executable, "-c", "import tensorflow_datasets"], cwd=REPO,
                         capture_output=True, check=False)
  return probe.returncode == 0


def check_data(args):
  """Before anything is written: ValueError (one sentence naming what to provide) when
  Fashion-MNIST is read through TFDS and TensorFlow Datasets cannot be imported."""
  if reads_tfds(args) and not tfds_importable():
    from rrcm_jax.data import arrays as arrays_lib  # pylint: disable=g-import-not-at-top
    raise ValueError(
        f"Fashion-MNIST needs its IDX files ({IDX_FILES}) in the folder given by --arrays DIR "
        f"or in {arrays_lib.DEBIAN_FOLDERS['fashion_mnist']} (Debian's dataset-fashion-mnist), "
        "or TensorFlow Datasets, and none of them is available here.")
