"""Whole datasets as numpy arrays, without TensorFlow: IDX files, .npz, CIFAR pickles, TFDS.

For the on-device input path (`device`): small datasets are read once into
host memory, uint8 images [N, H, W, C] and int32 labels [N], in the ORIGINAL
files' order (IDX order for MNIST / Fashion-MNIST, batch order data_batch_1..5
then test_batch for CIFAR-10), so an example's index is its canonical index
(Cohen et al.'s "every 20th CIFAR-10 test image" counts in that order).

Where the arrays come from (`data.arrays`, else by `data.name`):
  * a folder of IDX files `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
    `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]` (MNIST, Fashion-MNIST;
    splits "train" and "test"); name="fashion_mnist" defaults to the Debian package
    `dataset-fashion-mnist`'s /usr/share/datasets/fashion-mnist;
  * a CIFAR python folder as downloaded (`cifar-10-batches-py`: data_batch_1..5 and
    test_batch; `cifar-100-python`: train and test, fine labels);
  * an `.npz` file with x_<split> (uint8 [N, H, W] or [N, H, W, C]) and y_<split>
    (integer [N]) for every split, e.g. x_train / y_train / x_test / y_test;
  * otherwise TFDS (`tfds.load(name, batch_size=-1)`), when TensorFlow is installed; TFDS
    stores examples in its own (shuffled) order, which differs from the files' order.

Split specs are TFDS's ("train", "train[:90%]", "train[90%:]", "test[:500]",
"test+train[:10]"), resolved exactly as TFDS resolves them (percent bounds
rounded to the closest example), but over the files' order: "train[90%:]" holds
out the last 6,000 Fashion-MNIST training images of the IDX file, where the
TFDS path holds out the last 6,000 of TFDS's order (same sizes, other images).
"""
import dataclasses
import functools
import gzip
import pickle
import re

import numpy as np
from etils import epath

DEBIAN_FOLDERS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_SPLIT_PATTERN = re.compile(r"\s*([\w-]+)\s*(?:\[\s*(-?[\d.]*)\s*(%?)\s*:\s*(-?[\d.]*)\s*(%?)\s*\])?\s*")


@dataclasses.dataclass(frozen=True)
class SplitArrays:
  """The examples of one split spec, in split order.

  Attributes:
    images: uint8 [N, H, W, C], pixels [0, 255].
    labels: int32 [N].
    index: int64 [N], each example's position in its named split.
  """
  images: np.ndarray
  labels: np.ndarray
  index: np.ndarray

  def __len__(self):
    return len(self.labels)


# ------------------------------------------------------------------ file formats


def read_idx(path):
  """An IDX file (gzip or raw) -> numpy array of its shape and type."""
  data = epath.Path(path).read_bytes()   # local or gs://
  if data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)
  if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (magic {data[:4]!r}).")
  dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  offset = 4 + 4 * ndim
  if len(data) - offset != int(np.prod(shape)) * dtype.itemsize:
    raise ValueError(f"{path}: {len(data) - offset} data bytes do not match the header's shape {shape}.")
  return np.frombuffer(data, dtype, offset=offset).reshape(shape)


def _find(folder, stem):
  for name in (stem, stem + ".gz"):
    if (epath.Path(folder) / name).exists():
      return str(epath.Path(folder) / name)
  return None


def load_idx_folder(folder):
  """{"train", "test": (uint8 [N, H, W, 1], int32 [N])} from the four MNIST-style IDX files."""
  splits = {}
  for split, (image_stem, label_stem) in _IDX_FILES.items():
    image_path, label_path = _find(folder, image_stem), _find(folder, label_stem)
    if image_path is None or label_path is None:
      raise ValueError(f"{folder} lacks {image_stem}[.gz] or {label_stem}[.gz] (MNIST-style IDX files).")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or len(images) != len(labels):
      raise ValueError(f"{image_path}: expected [N, H, W] images for {len(labels)} labels, got {images.shape}.")
    splits[split] = (images[..., None].astype(np.uint8), labels.astype(np.int32))
  return splits


def load_cifar_folder(folder):
  """{"train", "test": (uint8 [N, 32, 32, 3], int32 [N])} from CIFAR-10 / CIFAR-100 python pickles."""
  def read(name):
    with (epath.Path(folder) / name).open("rb") as f:
      batch = pickle.load(f, encoding="bytes")
    labels = batch.get(b"labels", batch.get(b"fine_labels"))
    images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(labels, np.int32)

  if (epath.Path(folder) / "data_batch_1").exists():              # CIFAR-10
    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    train = (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]))
    return {"train": train, "test": read("test_batch")}
  return {"train": read("train"), "test": read("test")}             # CIFAR-100


def load_npz(path):
  """{split: (uint8 [N, H, W, C], int32 [N])} from an .npz with x_<split> / y_<split> pairs."""
  with epath.Path(path).open("rb") as file, np.load(file) as f:
    names = [k[2:] for k in f.files if k.startswith("x_") and "y_" + k[2:] in f.files]
    if not names:
      raise ValueError(f"{path} holds no x_<split> / y_<split> pairs (e.g. x_train, y_train); "
                       f"it holds {sorted(f.files)}.")
    splits = {}
    for name in names:
      images, labels = f["x_" + name], f["y_" + name]
      if images.ndim == 3:
        images = images[..., None]
      if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"{path}: x_{name} must be uint8 [N, H, W(, C)] with one label each in "
                         f"y_{name}; got {images.dtype} {images.shape} and {len(labels)} labels.")
      splits[name] = (images, np.asarray(labels).reshape(-1).astype(np.int32))
  return splits


def load_tfds(name, data_dir=None):
  """{split: (uint8 [N, H, W, C], int32 [N])} through TFDS (needs TensorFlow); TFDS's order."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from rrcm_jax.data import import_tensorflow  # pylint: disable=g-import-not-at-top
    import_tensorflow()
  except ImportError as e:
    raise ValueError(f"data.name={name!r} without data.arrays needs TensorFlow Datasets, which is not "
                     "installed; set data.arrays to an IDX folder, a CIFAR python folder or an "
                     ".npz file.") from e
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare()
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  out = {}
  for split in builder.info.splits:
    ex = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    out[split] = (np.asarray(ex[image_key], np.uint8), np.asarray(ex[label_key], np.int32))
  return out


@functools.lru_cache(maxsize=4)
def _load(kind, path, name):
  loaders = {"idx": load_idx_folder, "cifar": load_cifar_folder, "npz": load_npz,
             "tfds": lambda p: load_tfds(name, p)}
  return loaders[kind](path)


def source_of(data_cfg):
  """(kind, path) the config's arrays come from: "idx" | "cifar" | "npz" | "tfds"."""
  path = data_cfg.get("arrays", None)
  if path is None:
    folder = DEBIAN_FOLDERS.get(data_cfg.name)
    if folder and _find(folder, _IDX_FILES["train"][0]):
      return "idx", folder
    return "tfds", data_cfg.get("data_dir", None)
  if path.endswith(".npz"):
    return "npz", path
  if epath.Path(path).is_dir():
    if _find(path, _IDX_FILES["train"][0]):
      return "idx", path
    if any((epath.Path(path) / f).exists() for f in ("data_batch_1", "train")):
      return "cifar", path
  raise ValueError(f"data.arrays={path!r} is neither an .npz file, a folder of MNIST-style IDX files "
                   "nor a CIFAR python folder (cifar-10-batches-py, cifar-100-python).")


def named_splits(data_cfg):
  """{split name: (images uint8 [N, H, W, C], labels int32 [N])} of the config's dataset."""
  kind, path = source_of(data_cfg)
  return _load(kind, path, data_cfg.name)


# ------------------------------------------------------------------ split specs


def _bound(value, percent, size, default):
  if value == "":
    return default
  bound = int(round(float(value) * size / 100.0)) if percent else int(value)
  if abs(bound) > size:
    raise ValueError(f"slice bound {value}{'%' if percent else ''} is outside a split of {size} examples.")
  return bound + size if bound < 0 else bound


def split_ranges(split, sizes):
  """A TFDS split spec -> [(name, start, stop)], as TFDS resolves it ("closest" rounding).

  sizes: {split name: number of examples}.
  """
  ranges = []
  for part in split.split("+"):
    m = _SPLIT_PATTERN.fullmatch(part)
    if not m:
      raise ValueError(f"split={split!r} is not a split spec such as 'train' or 'train[:90%]'.")
    name, lo, lo_pct, hi, hi_pct = m.groups()
    if name not in sizes:
      raise ValueError(f"split {name!r} is not one of {sorted(sizes)}.")
    percent = bool(lo_pct or hi_pct)
    size = sizes[name]
    start, stop = _bound(lo or "", percent, size, 0), _bound(hi or "", percent, size, size)
    ranges.append((name, start, max(start, stop)))
  return ranges


def load_split(data_cfg, split):
  """The `SplitArrays` of a split spec of the config's dataset (every process reads all of it)."""
  splits = named_splits(data_cfg)
  parts = [(splits[name], start, stop)
           for name, start, stop in split_ranges(split, {k: len(v[1]) for k, v in splits.items()})]
  images = np.concatenate([s[0][a:b] for s, a, b in parts])
  labels = np.concatenate([s[1][a:b] for s, a, b in parts])
  index = np.concatenate([np.arange(a, b, dtype=np.int64) for _, a, b in parts])
  if images.shape[1:] != (data_cfg.image_size, data_cfg.image_size, data_cfg.channels):
    raise ValueError(f"data.image_size={data_cfg.image_size} and data.channels={data_cfg.channels} "
                     f"do not match the stored images' shape {images.shape[1:]}; the device pipeline "
                     "does not resize.")
  return SplitArrays(images, labels, index)


def certification_subset(data_cfg, *, split, every=None, first=None):
  """[(index, image uint8 [S, S, C], label int)] to certify (`pipelines.certification_subset`).

  every=k: positions 0, k, 2k, ... of the split; first=n: the first n. Exactly one.
  """
  if (every is None) == (first is None):
    raise ValueError(f"certification_subset needs exactly one of every=k or first=n "
                     f"(got every={every!r}, first={first!r}).")
  if (every if first is None else first) < 1:
    raise ValueError(f"every/first must be a positive integer (got every={every!r}, first={first!r}).")
  data = load_split(data_cfg, split)
  picks = range(0, len(data), every) if every is not None else range(min(first, len(data)))
  return [(int(data.index[i]), data.images[i], int(data.labels[i])) for i in picks]
