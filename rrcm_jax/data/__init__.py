"""Input pipelines: TFDS / class-folder / synthetic sources, tf.image augmentations.

Modules:
  sources    per-process examples of a split (TFDS by name, "folder", "synthetic").
  augment    stateless tf.image ops and the pre-training / fine-tuning views.
  pipelines  the iterators the trainers read (pre-train, fine-tune, eval,
             certification subset) and `prefetch_to_device`.
  mixup      mixup / cutmix with label smoothing, in JAX on device (no TF).
  prepare    `python -m rrcm_jax.data.prepare fashion_mnist` (offline TFDS build).
  arrays     whole datasets as numpy (IDX files, CIFAR pickles, .npz; TFDS if
             installed), in the files' order, and TFDS-style split specs (no TF).
  device     on-device batches of in-memory datasets: `DeviceData`, `ConfigData` (no TF).
  device_augment  the pre-training / fine-tuning views as per-example JAX ops (no TF).

Importing `sources`, `augment` or `pipelines` imports TensorFlow (through
`import_tensorflow`, which hides every GPU from it first); `mixup`, `arrays`,
`device`, `device_augment` and this package do not, so the core library stays importable without TensorFlow.
Pipelines yield uint8 pixels in [0, 255], NHWC.
"""
import functools


@functools.cache
def import_tensorflow():
  """Imports TensorFlow once, with no GPU visible to it (JAX owns the accelerators)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  return tf
