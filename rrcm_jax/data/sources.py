"""Per-process examples of a split: TFDS by name, class folders, or synthetic images.

A data config (`configs/common.py:data_config`) picks the source by `name`:
  * any TFDS image-classification dataset ("cifar10", "imagenet2012",
    "fashion_mnist", "mnist", ...), read from `data_dir`;
  * "folder": ImageNet kept as `<folder>/<split>/<class>/<image>` (the layout of
    `tfds.folder_dataset.ImageFolder` and torchvision's ImageFolder; splits are
    the sub-folder names, e.g. "train" and "val"); classes are the sorted
    class-folder names, examples are ordered by class, then file name;
  * "synthetic": generated uint8 images with class-dependent stripes (tests and
    benchmarks without TFDS); sizes per split from `synthetic_examples`.

Split strings are TFDS split specs ("train", "train[:90%]", "test[:500]").
Each process reads a contiguous block of the split, the block
`tfds.even_splits(split, n=process_count)[process_index]` selects.

A `Source` hands out *records* (still encoded: image bytes, a file path or, for
synthetic data, nothing) in split order, and `decode` turns a record into
`{"image": uint8 [H, W, C], "label": int32}`; decoding after shuffling and
skipping keeps resuming cheap. Sources with `lookup` are random access (a
record from its local position), so an epoch is a permutation of positions.
"""
import dataclasses
import functools
import os
import re
from typing import Callable, Optional

import jax
import numpy as np

from rrcm_jax.data import import_tensorflow

tf = import_tensorflow()

SYNTHETIC_EXAMPLES = {"train": 10_000, "test": 1_000}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class Source:
  """One process's examples of one split.

  Attributes:
    num_examples: number of local examples.
    records: tf.data.Dataset of the local records in split order; each has
      "label" int32 and "index" int64 (position in its named split).
    decode: record -> {"image": uint8 [H, W, C], "label": int32}.
    lookup: local position (int64 scalar tensor) -> record, or None when the
      source can only be read in order.
  """
  num_examples: int
  records: "tf.data.Dataset"
  decode: Callable[[dict], dict]
  lookup: Optional[Callable] = None


def process_ranges(split, split_sizes, process_index, process_count):
  """The (split name, start, stop) blocks that process `process_index` reads.

  Args:
    split: a TFDS split spec, e.g. "train", "train[:90%]", "test+train[:10]".
    split_sizes: {split name: number of examples}.
    process_index, process_count: this process and how many there are.

  Returns:
    A list of (name, start, stop) half-open ranges (`tfds.even_splits` blocks).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[size], num_bytes=0)
           for name, size in split_sizes.items()}
  part = tfds.even_splits(split, n=process_count)[process_index]
  return [(a.splitname, a.from_ or 0, split_sizes[a.splitname] if a.to is None else a.to)
          for a in part.to_absolute(infos)]


def split_names(split):
  """The split names a TFDS split spec refers to ("test+train[:9]" -> ["test", "train"])."""
  parts = [re.fullmatch(r"\s*([\w-]+)\s*(\[[^\]]*\])?\s*", p) for p in split.split("+")]
  if not all(parts):
    raise ValueError(f"split={split!r} is not a TFDS split spec such as 'train' or 'train[:90%]'.")
  return [m.group(1) for m in parts]


def num_examples(data_cfg, split):
  """Number of examples of `split` over all processes."""
  sizes = split_sizes(data_cfg, split)
  return sum(stop - start for _, start, stop in process_ranges(split, sizes, 0, 1))


def split_sizes(data_cfg, split):
  """{split name: number of examples} for the names `split` refers to."""
  names = split_names(split)
  if data_cfg.name == "synthetic":
    sizes = _synthetic_sizes(data_cfg)
    for n in names:
      if n not in sizes:
        raise ValueError(f"synthetic split {n!r} is not one of {sorted(sizes)} "
                         "(set data.synthetic_examples).")
    return {n: int(sizes[n]) for n in names}
  if data_cfg.name == "folder":
    return {n: len(_folder_listing(_folder_root(data_cfg), n)[0]) for n in names}
  builder = _tfds_builder(data_cfg.name, data_cfg.get("data_dir", None))
  return {n: _tfds_split_size(builder, n) for n in names}


def source(data_cfg, split, *, process_index=None, process_count=None):
  """This process's `Source` for `split` (defaults: jax.process_index/count)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ranges = process_ranges(split, split_sizes(data_cfg, split), process_index, process_count)
  ranges = [r for r in ranges if r[2] > r[1]]
  if data_cfg.name == "synthetic":
    src = _synthetic_source(data_cfg, ranges)
  elif data_cfg.name == "folder":
    src = _folder_source(data_cfg, ranges)
  else:
    src = _tfds_source(data_cfg, split, ranges)
  return _cached(src, data_cfg) if data_cfg.get("cache", False) else src


def decode_image(data, channels):
  """Encoded JPEG/PNG bytes -> uint8 [H, W, channels]."""
  image = tf.io.decode_image(data, channels=channels, expand_animations=False)
  return tf.ensure_shape(image, [None, None, channels])


def _range_indices(ranges):
  """int64 [n]: the in-split index of every example `ranges` select, in order."""
  parts = [np.arange(start, stop, dtype=np.int64) for _, start, stop in ranges]
  return np.concatenate(parts) if parts else np.zeros([0], np.int64)


# ------------------------------------------------------------------ TFDS


def _tfds_builder(name, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for unknown names
    raise ValueError(f"data.name={name!r} is neither a TFDS dataset, 'folder' nor "
                     f"'synthetic' ({e}).") from e
  try:
    builder.download_and_prepare()
  except Exception as e:
    hint = (" Offline: run `python -m rrcm_jax.data.prepare fashion_mnist`."
            if name == "fashion_mnist" else "")
    raise RuntimeError(f"TFDS could not prepare {name!r} in data_dir={data_dir!r}: {e}.{hint}") from e
  return builder


def _tfds_split_size(builder, name):
  if builder.info.splits:
    if name not in builder.info.splits:
      raise ValueError(f"split {name!r} is not one of {list(builder.info.splits)} "
                       f"for TFDS dataset {builder.name!r}.")
    return builder.info.splits[name].num_examples
  # tfds.testing.mock_data leaves info.splits empty; its datasets know their size.
  return int(builder.as_dataset(split=name).cardinality())


def _tfds_source(data_cfg, split, ranges):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(data_cfg.name, data_cfg.get("data_dir", None))
  image_key, label_key = builder.info.supervised_keys or ("image", "label")

  def read(name, start, stop):
    ds = builder.as_dataset(split=f"{name}[{start}:{stop}]", shuffle_files=False,
                            decoders={image_key: tfds.decode.SkipDecoding()})
    ds = ds.take(stop - start)  # mock_data ignores slices
    index = tf.data.Dataset.range(start, stop)
    return tf.data.Dataset.zip(ds, index).map(lambda ex, i: {
        "image": ex[image_key], "label": tf.cast(ex[label_key], tf.int32), "index": i})

  records = [read(*r) for r in ranges]
  if not records:  # more processes than examples: an empty dataset of the right structure
    records = [read(split_names(split)[0], 0, 1).take(0)]
  records = functools.reduce(lambda a, b: a.concatenate(b), records)
  channels = data_cfg.channels
  return Source(
      num_examples=int(sum(stop - start for _, start, stop in ranges)),
      records=records,
      decode=lambda r: {"image": decode_image(r["image"], channels), "label": r["label"]})


# ------------------------------------------------------------------ class folders


def _folder_root(data_cfg):
  root = data_cfg.get("folder", None)
  if not root:
    raise ValueError("data.name='folder' needs data.folder=<root with train/ and val/ class folders>.")
  return root


@functools.cache
def _folder_listing(root, split_name):
  """(paths, labels) of `root/split_name`, ordered by class then file name."""
  split_dir = os.path.join(root, split_name)
  if not tf.io.gfile.isdir(split_dir):
    raise ValueError(f"split {split_name!r}: no folder {split_dir} under data.folder={root!r}.")
  classes = _folder_classes(root)
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_dir, name)
    if not tf.io.gfile.isdir(class_dir):
      continue
    files = sorted(f for f in tf.io.gfile.listdir(class_dir) if f.lower().endswith(_IMAGE_SUFFIXES))
    paths += [os.path.join(class_dir, f) for f in files]
    labels += [label] * len(files)
  return tuple(paths), tuple(labels)


@functools.cache
def _folder_classes(root):
  """Sorted class-folder names over every split (as tfds ImageFolder labels them)."""
  classes = set()
  for split in tf.io.gfile.listdir(root):
    split_dir = os.path.join(root, split.rstrip("/"))
    if tf.io.gfile.isdir(split_dir):
      classes.update(c.rstrip("/") for c in tf.io.gfile.listdir(split_dir)
                     if tf.io.gfile.isdir(os.path.join(split_dir, c)))
  return sorted(classes)


def _folder_source(data_cfg, ranges):
  root = _folder_root(data_cfg)
  paths, labels = [], []
  for name, start, stop in ranges:
    split_paths, split_labels = _folder_listing(root, name)
    paths += split_paths[start:stop]
    labels += split_labels[start:stop]
  table = {"path": tf.constant(paths, tf.string), "label": tf.constant(labels, tf.int32),
           "index": tf.constant(_range_indices(ranges))}
  lookup = lambda i: {k: tf.gather(v, i) for k, v in table.items()}
  channels = data_cfg.channels
  return Source(
      num_examples=len(paths),
      records=tf.data.Dataset.range(len(paths)).map(lookup),
      decode=lambda r: {"image": decode_image(tf.io.read_file(r["path"]), channels),
                        "label": r["label"]},
      lookup=lookup)


# ------------------------------------------------------------------ synthetic


def synthetic_image(index, label, *, size, channels, num_classes, split_id=0):
  """A deterministic uint8 [size, size, channels] image of class `label`.

  Stripes whose orientation and frequency depend on the class, a class tint
  per channel, a random phase and pixel noise seeded by (split_id, index).
  """
  seed = tf.stack([tf.cast(split_id, tf.int64), tf.cast(index, tf.int64)])
  label_f = tf.cast(label, tf.float32)
  angle = np.pi * label_f / num_classes
  freq = 2.0 + tf.math.floormod(label_f, 4.0)
  phase = 2 * np.pi * tf.random.stateless_uniform([], seed)
  grid = tf.linspace(0.0, 1.0, size)
  yy, xx = tf.meshgrid(grid, grid, indexing="ij")
  wave = 0.5 + 0.3 * tf.sin(2 * np.pi * freq * (xx * tf.cos(angle) + yy * tf.sin(angle)) + phase)
  tint = 0.7 + 0.3 * tf.cos(2 * np.pi * (label_f / num_classes + tf.range(channels, dtype=tf.float32) / channels))
  noise = 0.06 * tf.random.stateless_normal([size, size, channels], seed + 1)
  image = tf.clip_by_value(wave[..., None] * tint + noise, 0.0, 1.0)
  return tf.cast(tf.round(image * 255.0), tf.uint8)


def _synthetic_sizes(data_cfg):
  return SYNTHETIC_EXAMPLES | dict(data_cfg.get("synthetic_examples", None) or {})


def _synthetic_source(data_cfg, ranges):
  names = sorted(_synthetic_sizes(data_cfg))
  split_ids = [np.full([stop - start], names.index(name), np.int64) for name, start, stop in ranges]
  split_ids = np.concatenate(split_ids) if split_ids else np.zeros([0], np.int64)
  table = {"index": tf.constant(_range_indices(ranges)), "split_id": tf.constant(split_ids)}
  num_classes = data_cfg.num_classes

  def lookup(i):
    index = tf.gather(table["index"], i)
    label = tf.cast(tf.math.floormod(index * 7919, num_classes), tf.int32)  # classes interleaved
    return {"index": index, "split_id": tf.gather(table["split_id"], i), "label": label}

  size = data_cfg.get("synthetic_image_size", None) or data_cfg.image_size
  decode = lambda r: {"image": synthetic_image(
      r["index"], r["label"], size=size, channels=data_cfg.channels, num_classes=num_classes,
      split_id=r["split_id"]), "label": r["label"]}
  n = len(split_ids)
  return Source(n, tf.data.Dataset.range(n).map(lookup), decode, lookup)


# ------------------------------------------------------------------ in-memory cache


def _cached(src, data_cfg):
  """Decodes every local example once into memory; a random-access `Source`.

  For datasets whose images share one shape (CIFAR-10, Fashion-MNIST, ...).
  """
  if src.num_examples == 0:
    return src
  decoded = src.records.map(lambda r: {**src.decode(r), "index": r["index"]},
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  try:
    table = decoded.batch(src.num_examples).get_single_element()
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(f"data.cache=True needs images of one size, and {data_cfg.name!r} has "
                     "several; set data.cache=False.") from e
  lookup = lambda i: {k: tf.gather(v, i) for k, v in table.items()}
  return Source(src.num_examples, tf.data.Dataset.range(src.num_examples).map(lookup),
                lambda r: {"image": r["image"], "label": r["label"]}, lookup)
