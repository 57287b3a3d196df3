"""On-device input pipeline for in-memory datasets: no TensorFlow, no host work per step.

`DeviceData` places a split's uint8 images on the devices once, sharded over
the mesh's "data" axis (each process puts its own share), and builds every
batch with one jitted program: the step's example indices are gathered from
the shards (each device keeps the images it holds, a reduce-scatter brings
every device its slice of the batch) and augmented there, per example, with
`device_augment` (`jax.vmap`). Batches are global jax.Arrays sharded on "data";
the trainers feed them to their step functions as they are.

Randomness (stateless, so a restart at step k sees batches k, k+1, ... of an
uninterrupted run, whatever the number of devices or processes):
  * order: global stream position g = step * B + j (j < B, the global batch) is
    example perm_e[g mod N] of epoch e = g div N, perm_e a permutation of the N
    examples drawn from key(seed) folded with a shuffle stream and e. Batches
    run across epoch boundaries and nothing is dropped, as the tf.data path's
    concatenated epochs; unlike it, one permutation covers the whole split
    (tf.data permutes each process's block separately);
  * augmentation: example j of step s draws u ~ U[0, 1)^(views x 36) from
    key(seed) folded with an augmentation stream, s and j.

Pixels stay uint8 [0, 255], NHWC, as every pipeline yields them.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rrcm_jax import parallel
from rrcm_jax.data import arrays as arrays_lib
from rrcm_jax.data import device_augment as aug

_SHUFFLE_STREAM, _AUGMENT_STREAM = 1, 2
PIPELINES = ("device", "tfdata")
# Datasets small enough (<= 2 GB of uint8) to live on the devices: data.pipeline=None -> "device".
DEVICE_DATASETS = ("fashion_mnist", "mnist", "cifar10")


def resolve_pipeline(config):
  """The config with data.pipeline filled in ("device" or "tfdata"); a copy if it changes.

  None chooses "device" for DEVICE_DATASETS and whenever data.arrays is set, unless the
  fine-tuning augmentation is "autoaug" (tf.data only); else "tfdata".
  """
  data, augment = config.data, config.get("augment", "none")
  pipeline = data.get("pipeline", None)
  if pipeline is None:
    in_memory = data.name in DEVICE_DATASETS or data.get("arrays", None) is not None
    pipeline = "device" if in_memory and augment in aug.DEVICE_FINETUNE_AUGMENTS else "tfdata"
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.pipeline = pipeline
  if pipeline not in PIPELINES:
    raise ValueError(f"config.data.pipeline={pipeline!r} is not one of {PIPELINES} (or None: "
                     "chosen by the dataset).")
  if pipeline == "device" and augment not in aug.DEVICE_FINETUNE_AUGMENTS:
    raise ValueError(f"config.augment={augment!r} needs config.data.pipeline='tfdata'; the device "
                     f"pipeline has {aug.DEVICE_FINETUNE_AUGMENTS}.")
  return config


def _put(array, sharding):
  """A global array from the same numpy array on every process (each places its share)."""
  return jax.make_array_from_callback(array.shape, sharding, lambda i: array[i])


class DeviceData:
  """One split's examples on the devices of `mesh`, and the batch iterators over them.

  Args:
    images: uint8 [N, S, S, C] numpy, the same on every process (all of the split).
    labels: integer [N].
    mesh: a mesh with a "data" axis (`parallel.make_mesh`).
    seed: the run's seed; order and augmentations derive from it.
    index: optional int [N], each example's index in its named split (eval batches'
      "index"; default 0..N-1).
  """

  def __init__(self, images, labels, mesh, seed, index=None):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2]:
      raise ValueError(f"images must be uint8 [N, S, S, C]; got {images.dtype} {images.shape}.")
    if len(labels) != len(images) or len(images) == 0:
      raise ValueError(f"need one label per image and at least one image; got {len(images)} "
                       f"images and {len(labels)} labels.")
    self.mesh, self.seed, self.num_examples = mesh, int(seed), len(images)
    self.shape = images.shape[1:]
    devices = mesh.shape[parallel.DATA]
    self._per_device = -(-len(images) // devices)
    padded = np.zeros((self._per_device * devices,) + self.shape, np.uint8)
    padded[:len(images)] = images
    sharding = NamedSharding(mesh, P(parallel.DATA))
    self.images = _put(padded, sharding)
    replicated = parallel.replicated(mesh)
    self.labels = _put(labels.astype(np.int32), replicated)
    index = np.arange(len(images)) if index is None else np.asarray(index)
    self.index = _put(index.astype(np.int32), replicated)
    self._key = jax.random.key(self.seed)
    self._shuffle_key = jax.random.fold_in(self._key, _SHUFFLE_STREAM)
    n = self.num_examples
    self._permute = jax.jit(lambda k: jax.random.permutation(k, n).astype(jnp.int32),
                            out_shardings=replicated)

  @classmethod
  def from_config(cls, data_cfg, split, mesh, seed):
    """The examples of `split` of the config's dataset (`arrays.load_split`)."""
    data = arrays_lib.load_split(data_cfg, split)
    return cls(data.images, data.labels, mesh, seed, index=data.index)

  # ---------------------------------------------------------------- iterators

  def pretrain_batches(self, start_step, global_batch, crop_scale=aug.PRETRAIN_CROP_SCALE):
    """Infinite iterator of {"x", "a1", "a2"}: uint8 [global_batch, S, S, C] global arrays.

    Batch k is step start_step + k. crop_scale: (min, max) area fraction of a1 / a2's crops.
    """
    self._check_batch(global_batch)
    crop_scale = tuple(float(c) for c in crop_scale)
    if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
      raise ValueError(f"crop_scale={crop_scale} must be (min, max) with 0 < min <= max <= 1.")
    return self._stream(self._program(global_batch, "pretrain", crop_scale), start_step, global_batch)

  def finetune_batches(self, start_step, global_batch, augment="none"):
    """Infinite iterator of {"image": uint8 [B, S, S, C], "label": int32 [B]} global arrays.

    augment: "none", "weak" (flip) or "strong" (random resized crop 0.4-1 + flip).
    """
    self._check_batch(global_batch)
    if augment not in aug.DEVICE_FINETUNE_AUGMENTS:
      raise ValueError(f"augment={augment!r} is not available with data.pipeline='device' "
                       f"(allowed: {aug.DEVICE_FINETUNE_AUGMENTS}); use data.pipeline='tfdata' for it.")
    return self._stream(self._program(global_batch, "finetune", augment), start_step, global_batch)

  def eval_batches(self, global_batch):
    """Finite iterator over the split in order: {"image" uint8 [B, S, S, C], "label" int32 [B],
    "mask" bool [B], "index" int32 [B]}; the last batch is padded (mask False, label 0, index -1)."""
    self._check_batch(global_batch, allow_larger=True)
    fn = self._eval_program(global_batch)
    for start in range(0, self.num_examples, global_batch):
      yield fn(self.images, self.labels, self.index, np.int32(start))

  # ---------------------------------------------------------------- internals

  def _check_batch(self, global_batch, allow_larger=False):
    devices = self.mesh.shape[parallel.DATA]
    if global_batch < 1 or global_batch % devices or global_batch % jax.process_count():
      raise ValueError(f"global batch {global_batch} must be a positive multiple of the device "
                       f"count {devices} and of the process count {jax.process_count()}.")
    if not allow_larger and global_batch > self.num_examples:
      raise ValueError(f"global batch {global_batch} exceeds the split's {self.num_examples} examples.")

  @functools.lru_cache(maxsize=4)
  def _permutation(self, epoch):
    """int32 [N], replicated: the order of epoch `epoch` (one compiled program for all)."""
    return self._permute(jax.random.fold_in(self._shuffle_key, epoch))

  def _stream(self, fn, start_step, global_batch):
    for step in itertools.count(int(start_step)):
      epoch, offset = divmod(step * global_batch, self.num_examples)
      yield fn(self.images, self.labels, self._permutation(epoch), self._permutation(epoch + 1),
               np.int32(offset), np.uint32(step))

  def _gather(self, local, idx):
    """Inside shard_map: examples idx [B] (global positions) -> this device's slice [B / D]."""
    offset = jax.lax.axis_index(parallel.DATA) * self._per_device
    mine = (idx >= offset) & (idx < offset + self._per_device)
    picked = local[jnp.clip(idx - offset, 0, self._per_device - 1)]
    picked = jnp.where(mine[:, None, None, None], picked, jnp.zeros((), local.dtype))
    # Exactly one device holds each example: the sum of the contributions is the example.
    return jax.lax.psum_scatter(picked, parallel.DATA, scatter_dimension=0, tiled=True)

  @functools.lru_cache(maxsize=8)
  def _program(self, global_batch, kind, option):
    """jit: (images, labels, perm_e, perm_e+1, offset, step) -> the step's batch dict.

    kind "pretrain" (option: crop scale) or "finetune" (option: augment name).
    """
    if kind == "pretrain":
      view = functools.partial(aug.pretrain_views, crop_scale=option)
    else:
      view = lambda image, key: {"image": aug.finetune_view(image, key, option)}
    n, devices = self.num_examples, self.mesh.shape[parallel.DATA]
    per_device = global_batch // devices
    augment_key = jax.random.fold_in(self._key, _AUGMENT_STREAM)

    def local_batch(local_images, labels, perm_a, perm_b, offset, step):
      pos = offset + jnp.arange(global_batch, dtype=jnp.int32)
      idx = jnp.where(pos < n, perm_a[jnp.minimum(pos, n - 1)], perm_b[jnp.maximum(pos - n, 0)])
      images = self._gather(local_images, idx)
      first = jax.lax.axis_index(parallel.DATA) * per_device
      mine = first + jnp.arange(per_device, dtype=jnp.int32)     # positions in the global batch
      step_key = jax.random.fold_in(augment_key, step)
      keys = jax.vmap(lambda j: jax.random.fold_in(step_key, j))(mine)
      out = jax.vmap(view)(images, keys)
      if kind == "finetune":
        out["label"] = jax.lax.dynamic_slice_in_dim(labels[idx], first, per_device)
      return out

    spec = P(parallel.DATA)
    mapped = jax.shard_map(local_batch, mesh=self.mesh, in_specs=(spec, P(), P(), P(), P(), P()),
                           out_specs=spec)
    return jax.jit(mapped)

  @functools.lru_cache(maxsize=4)
  def _eval_program(self, global_batch):
    """jit: (images, labels, index, start) -> the eval batch of positions start .. start + B - 1."""
    n, devices = self.num_examples, self.mesh.shape[parallel.DATA]
    per_device = global_batch // devices

    def local_batch(local_images, labels, index, start):
      pos = start + jnp.arange(global_batch, dtype=jnp.int32)
      valid = pos < n
      images = self._gather(local_images, jnp.where(valid, pos, -1))   # -1: no device holds it
      first = jax.lax.axis_index(parallel.DATA) * per_device
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, first, per_device)
      safe = jnp.minimum(pos, n - 1)
      return {"image": images, "label": sl(jnp.where(valid, labels[safe], 0)), "mask": sl(valid),
              "index": sl(jnp.where(valid, index[safe], -1))}

    spec = P(parallel.DATA)
    mapped = jax.shard_map(local_batch, mesh=self.mesh, in_specs=(spec, P(), P(), P()),
                           out_specs=spec)
    return jax.jit(mapped)


class ConfigData:
  """The trainers' data interface over `DeviceData` for `data.pipeline = "device"`.

  Mirrors finetune.PipelineData (num_train, train, evaluate) and adds pretrain;
  batches are global jax.Arrays already sharded on "data" (no
  `parallel.global_batch` needed). The splits are read once (`arrays.load_split`).
  """

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self._splits = {}

  def split(self, name):
    """The `DeviceData` of split spec `name` (one per spec, built on first use)."""
    if name not in self._splits:
      self._splits[name] = DeviceData.from_config(self.config.data, name, self.mesh, self.config.seed)
    return self._splits[name]

  def num_train(self):
    return self.split(self.config.data.train_split).num_examples

  def pretrain(self, start_step):
    """{"x", "a1", "a2"} global batches from step start_step on."""
    scale = self.config.data.get("pretrain_crop_scale", None) or aug.PRETRAIN_CROP_SCALE
    return self.split(self.config.data.train_split).pretrain_batches(
        start_step, self.config.batch_size, crop_scale=scale)

  def train(self, start_step):
    """{"image", "label"} global fine-tuning batches from step start_step on."""
    return self.split(self.config.data.train_split).finetune_batches(
        start_step, self.config.batch_size, self.config.get("augment", "none"))

  def evaluate(self, split):
    """{"image", "label", "mask", "index"} global batches over `split`, in order."""
    return self.split(split).eval_batches(self.config.eval_batch_size)
