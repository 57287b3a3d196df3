"""The input pipelines the trainers read: per-process numpy batches, then global jax.Arrays.

Every pipeline reads this process's block of the split (`sources.source`) and
yields numpy dicts of the *local* batch, `global_batch_size // process_count`
examples; `prefetch_to_device` assembles the global batch from them with
`jax.make_array_from_process_local_data`. Pixels are uint8 [0, 255], NHWC.

Training streams are infinite and exactly resumable: epoch e is a fixed
permutation of the local examples (seeded by (seed, process, e)), the stream
starts at local example `start_step * local_batch` (skipping before decoding),
and the augmentations of the example at stream position g draw from the
stateless seed (seed, process, g). So the batches after a restart at step k
equal batches k, k+1, ... of an uninterrupted run, whatever the parallelism.
"""
import collections
import itertools
import math
import re

import jax
import numpy as np

from rrcm_jax.data import augment as augment_lib
from rrcm_jax.data import import_tensorflow
from rrcm_jax.data import sources

tf = import_tensorflow()

_SHUFFLE_STREAM, _AUGMENT_STREAM = 1, 2


def num_examples(data_cfg, split):
  """Number of examples of `split` over all processes."""
  return sources.num_examples(data_cfg, split)


def pretrain_batches(data_cfg, *, global_batch_size, seed, start_step=0,
                     process_index=None, process_count=None):
  """Infinite iterator of {"x", "a1", "a2"}: uint8 [local_batch, S, S, C] each.

  x is the clean view (center view + flip), a1 / a2 the two BYOL-style views
  (`augment.pretrain_views`: crops per example, photometry per batch),
  S = data_cfg.image_size, read from data_cfg.train_split. Batch k of the
  iterator is global step start_step + k. data_cfg.pretrain_crop_scale (if set)
  is the (min, max) area fraction of a1 / a2's crops.
  """
  size = data_cfg.image_size
  scale = tuple(data_cfg.get("pretrain_crop_scale", augment_lib.PRETRAIN_CROP_SCALE))
  ds = _train_dataset(data_cfg, data_cfg.train_split, global_batch_size, seed, start_step,
                      lambda ex, s: augment_lib.pretrain_geometry(ex["image"], s, size, scale),
                      process_index, process_count, batch_view=augment_lib.pretrain_photometry)
  return ds.as_numpy_iterator()


def finetune_batches(data_cfg, *, split, global_batch_size, seed, start_step=0, augment="none",
                     process_index=None, process_count=None):
  """Infinite iterator of {"image": uint8 [b, S, S, C], "label": int32 [b]}, b the local batch.

  augment: "none", "weak", "strong" or "autoaug" (`augment.finetune_view`).
  """
  if augment not in augment_lib.FINETUNE_AUGMENTS:
    raise ValueError(f"augment={augment!r} is not one of {augment_lib.FINETUNE_AUGMENTS}.")
  size = data_cfg.image_size
  view = lambda ex, s: {"image": augment_lib.finetune_view(ex["image"], s, size, augment),
                        "label": ex["label"]}
  ds = _train_dataset(data_cfg, split, global_batch_size, seed, start_step, view,
                      process_index, process_count)
  return ds.as_numpy_iterator()


def eval_batches(data_cfg, *, split, global_batch_size, process_index=None, process_count=None):
  """Finite iterator of {"image" uint8 [b, S, S, C], "label" int32 [b], "mask" bool [b], "index" int64 [b]}.

  Split order, center view (`augment.eval_view`); padded with mask False,
  label 0 and index -1 so that every process yields the same number of
  batches and every example of the split has mask True exactly once over all
  processes. `index` is the example's position in its named split.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(global_batch_size, process_count)
  sizes = sources.split_sizes(data_cfg, split)
  counts = [sum(b - a for _, a, b in sources.process_ranges(split, sizes, p, process_count))
            for p in range(process_count)]
  num_batches = math.ceil(max(counts) / local_batch)
  src = sources.source(data_cfg, split, process_index=process_index, process_count=process_count)
  size, channels = data_cfg.image_size, data_cfg.channels

  def prepare(record):
    ex = src.decode(record)
    return {"image": augment_lib.eval_view(ex["image"], size), "label": ex["label"],
            "mask": tf.constant(True), "index": record["index"]}

  ds = src.records.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([size, size, channels], tf.uint8), "label": tf.constant(0, tf.int32),
      "mask": tf.constant(False), "index": tf.constant(-1, tf.int64)})
  ds = ds.concatenate(padding.repeat(num_batches * local_batch - src.num_examples))
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options()).as_numpy_iterator()


_CANONICAL_ID = re.compile(r"^(?:[a-z]+_?)?(\d+)$")   # CIFAR's "test_00042" -> 42


def canonical_indices(data_cfg, split):
  """int64 [N] or None: the original order's index of each example of the named `split`,
  listed in TFDS's (shuffled) order. CIFAR-10/100: the `id` feature ("test_00042" -> 42;
  TFDS numbers the examples in the order of the python batches, torchvision's and Cohen
  et al.'s). ImageNet (a `file_name` feature): the rank of (label, file name), the order of
  torchvision's ImageFolder over class folders (TFDS's labels are the sorted WordNet ids,
  ImageFolder's classes). None when the dataset has neither (its TFDS order is then the
  only one known) or is not TFDS."""
  if data_cfg.name in ("synthetic", "folder") or split not in sources.split_names(split):
    return None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = sources._tfds_builder(data_cfg.name, data_cfg.get("data_dir", None))  # pylint: disable=protected-access
  features = builder.info.features
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  key = "id" if "id" in features else "file_name" if "file_name" in features else None
  if key is None:
    return None
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={image_key: tfds.decode.SkipDecoding()})
  rows = [(bytes(name).decode(), int(label)) for name, label in
          ds.map(lambda ex: (ex[key], ex[label_key])).as_numpy_iterator()]
  if not rows:
    return None
  if key == "file_name":
    order = sorted(range(len(rows)), key=lambda k: (rows[k][1], rows[k][0]))
    index = np.empty(len(rows), np.int64)
    index[order] = np.arange(len(rows))
    return index
  matches = [_CANONICAL_ID.match(name) for name, _ in rows]
  if not all(matches):
    return None
  index = np.array([int(m.group(1)) for m in matches], np.int64)
  if len(set(index.tolist())) != len(index):
    raise ValueError(f"the `id` features of {data_cfg.name}'s {split!r} split do not number its "
                     "examples uniquely; they cannot give the original order.")
  return index


def certification_subset(data_cfg, *, split, every=None, first=None):
  """[(index, image uint8 [S, S, C], label int)] of the examples to certify, by index.

  The index is the example's canonical index: its position in the original
  files (`canonical_indices`: CIFAR's python batches through TFDS's `id`),
  else its position in the split as read (class folders are sorted like
  torchvision's ImageFolder; other TFDS datasets: TFDS's order). every=k:
  canonical positions 0, k, 2k, ... (Cohen et al.: k = 20 on the CIFAR-10
  test set, 100 on ImageNet val); first=n: the first n (the rRCM authors'
  choice). Exactly one of the two. Reads the whole split on every process
  (the certify CLI assigns images to processes).
  """
  if (every is None) == (first is None):
    raise ValueError(f"certification_subset needs exactly one of every=k or first=n "
                     f"(got every={every!r}, first={first!r}).")
  if (every if first is None else first) < 1:
    raise ValueError(f"every/first must be a positive integer (got every={every!r}, first={first!r}).")
  src = sources.source(data_cfg, split, process_index=0, process_count=1)
  canonical = canonical_indices(data_cfg, split)
  if canonical is None:
    canonical = np.arange(src.num_examples, dtype=np.int64)
  order = np.argsort(canonical, kind="stable")        # read positions in canonical order
  picks = order[::every] if every is not None else order[:first]
  wanted = tf.constant(np.isin(np.arange(len(canonical)), picks))
  records = src.records.enumerate().filter(lambda pos, _: tf.gather(wanted, pos))
  size = data_cfg.image_size

  def prepare(pos, record):
    ex = src.decode(record)
    return tf.gather(canonical, pos), augment_lib.eval_view(ex["image"], size), ex["label"]

  ds = records.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  chosen = [(int(i), image, int(label)) for i, image, label in ds.as_numpy_iterator()]
  return sorted(chosen, key=lambda item: item[0])


def prefetch_to_device(iterator, sharding, size=2):
  """Yields each numpy batch dict as global jax.Arrays, `size` batches ahead.

  Every leaf is the process-local part of a global array laid out by
  `sharding` (e.g. NamedSharding(mesh, P("data"))), assembled with
  jax.make_array_from_process_local_data. int64 leaves become int32 unless
  jax_enable_x64 is on.
  """
  def to_global(batch):
    def put(local):
      local = np.asarray(local)
      if local.dtype == np.int64 and not jax.config.jax_enable_x64:
        local = local.astype(np.int32)
      return jax.make_array_from_process_local_data(sharding, local)
    return jax.tree.map(put, batch)

  queue = collections.deque(to_global(b) for b in itertools.islice(iterator, size))
  while queue:
    yield queue.popleft()
    queue.extend(to_global(b) for b in itertools.islice(iterator, 1))


# ------------------------------------------------------------------ internals


def _process(process_index, process_count):
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def _local_batch(global_batch_size, process_count):
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                     f"process count {process_count}.")
  return global_batch_size // process_count


def _options():
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  options.threading.max_intra_op_parallelism = 1
  options.experimental_optimization.map_parallelization = True
  return options


def stream_seed(seed, process_index, stream):
  """int64 [2] stateless seed of one random stream of one process."""
  base = tf.constant([seed, stream], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, tf.constant(process_index, tf.int64))


def _epoch_records(src, shuffle_seed, epoch, shuffle_buffer, skip=0):
  """The local records of one epoch in its fixed shuffled order, the first `skip` left out."""
  seed = tf.random.experimental.stateless_fold_in(shuffle_seed, tf.cast(epoch, tf.int64))
  if src.lookup is not None:  # random access: a full permutation of the positions
    order = tf.random.experimental.stateless_shuffle(tf.range(src.num_examples, dtype=tf.int64), seed)
    return tf.data.Dataset.from_tensor_slices(order[skip:]).map(src.lookup)
  op_seed = tf.random.stateless_uniform([], seed, minval=None, maxval=None, dtype=tf.int64)
  records = src.records.shuffle(min(shuffle_buffer, src.num_examples), seed=op_seed,
                                reshuffle_each_iteration=False)
  return records.skip(skip)


def _train_dataset(data_cfg, split, global_batch_size, seed, start_step, view,
                   process_index, process_count, batch_view=None):
  """Batches of view(example, seed) (then batch_view(batch)) over a resumable stream of epochs."""
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(global_batch_size, process_count)
  src = sources.source(data_cfg, split, process_index=process_index, process_count=process_count)
  if src.num_examples == 0:
    raise ValueError(f"split={split!r} gives process {process_index} of {process_count} no examples.")
  start = start_step * local_batch
  first_epoch, offset = divmod(start, src.num_examples)
  shuffle_seed = stream_seed(seed, process_index, _SHUFFLE_STREAM)
  buffer = data_cfg.get("shuffle_buffer", 10_000)
  records = _epoch_records(src, shuffle_seed, first_epoch, buffer, skip=offset).concatenate(
      tf.data.Dataset.range(first_epoch + 1, np.iinfo(np.int64).max).flat_map(
          lambda e: _epoch_records(src, shuffle_seed, e, buffer)))
  augment_seed = stream_seed(seed, process_index, _AUGMENT_STREAM)

  def prepare(position, record):
    return view(src.decode(record), tf.random.experimental.stateless_fold_in(augment_seed, position))

  ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start), records)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  if batch_view is not None:
    ds = ds.map(batch_view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
