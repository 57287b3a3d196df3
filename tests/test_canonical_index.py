"""Certification images are chosen and indexed in the original files' order (Cohen et al.'s
and torchvision's): Fashion-MNIST from the IDX files, CIFAR-10 through TFDS's `id`."""
import gzip
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common, fashion_mnist_certify
from conftest import reference_file
from rrcm_jax import certify, certlog
from rrcm_jax.data import pipelines

tf = pipelines.tf
IDX = "/usr/share/datasets/fashion-mnist"
COHEN_CIFAR = reference_file("cohen2019/cifar10_resnet110_noise_0.25_sigma_0.25.tsv")


def _read_idx(path):
  """An IDX file's array, read here independently of rrcm_jax.data.arrays."""
  with gzip.open(path) as f:
    data = f.read()
  ndim = data[3]
  shape = np.frombuffer(data[4:4 + 4 * ndim], ">u4")
  return np.frombuffer(data[4 + 4 * ndim:], np.uint8).reshape(shape)


@pytest.mark.skipif(not os.path.isdir(IDX), reason="Debian's dataset-fashion-mnist is absent")
def test_fashion_mnist_images_are_every_kth_of_the_idx_file():
  config = fashion_mnist_certify.get_config()
  config.every, config.num_images = 250, 40
  chosen = certify.select_images(config)
  images = _read_idx(os.path.join(IDX, "t10k-images-idx3-ubyte.gz"))
  labels = _read_idx(os.path.join(IDX, "t10k-labels-idx1-ubyte.gz"))
  assert [i for i, _, _ in chosen] == list(range(0, 10000, 250))
  for index, image, label in chosen:
    np.testing.assert_array_equal(image[..., 0], images[index])
    assert label == labels[index]


def _cohen_labels():
  log = certlog.read_log(COHEN_CIFAR)
  return dict(zip(log["idx"].tolist(), log["label"].tolist()))


def _mock_cifar(num, order, labels):
  """as_dataset_fn for tfds.testing.mock_data: CIFAR-10's features with `id` "test_%05d" of
  the canonical index, stored in `order` (TFDS's shuffled order); image k shows its index."""
  canonical = np.asarray(order)
  images = np.zeros((num, 32, 32, 3), np.uint8)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = canonical % 256, canonical // 256
  ids = [f"test_{i:05d}" for i in canonical]

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del self, read_config, shuffle_files
    assert str(split).startswith("test")   # the whole split (sources reads test[0:N])
    ds = tf.data.Dataset.from_tensor_slices(
        {"id": ids, "image": images, "label": labels[canonical].astype(np.int64)})
    if decoders and "image" in decoders:   # SkipDecoding: the encoded bytes
      ds = ds.map(lambda ex: dict(ex, image=tf.io.encode_png(ex["image"])))
    return ds
  return as_dataset


def test_cifar10_every_20th_is_cohens_subset_through_the_id_feature():
  cohen = _cohen_labels()
  num = 10000
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, num)
  for idx, label in cohen.items():
    labels[idx] = label
  order = rng.permutation(num)
  cfg = common.data_config("cifar10", image_size=32, channels=3, num_classes=10)
  with tfds.testing.mock_data(as_dataset_fn=_mock_cifar(num, order, labels)):
    assert pipelines.canonical_indices(cfg, "test").tolist() == order.tolist()
    chosen = pipelines.certification_subset(cfg, split="test", every=20)
  assert [i for i, _, _ in chosen] == list(range(0, num, 20)) == sorted(cohen)
  assert all(label == cohen[i] for i, _, label in chosen)
  assert all(int(image[0, 0, 0]) + 256 * int(image[0, 1, 0]) == i for i, image, _ in chosen)
  assert (cohen[0], cohen[20], cohen[40]) == (3, 7, 4)


def test_datasets_without_ids_keep_their_order():
  cfg = common.data_config("synthetic", image_size=8, channels=3, num_classes=4)
  cfg.synthetic_examples = {"train": 8, "test": 30}
  assert pipelines.canonical_indices(cfg, "test") is None
  assert [i for i, _, _ in pipelines.certification_subset(cfg, split="test", every=7)] == [
      0, 7, 14, 21, 28]


def test_imagenet_val_is_indexed_in_imagefolder_order():
  """(label, file name) order: ImageFolder's over val/<wnid>/ILSVRC2012_val_*.JPEG."""
  rng = np.random.default_rng(1)
  num = 24
  labels = rng.integers(0, 3, num)
  names = np.array([f"ILSVRC2012_val_{k + 1:08d}.JPEG" for k in rng.permutation(num)])

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del self, read_config, shuffle_files
    assert str(split).startswith("validation")
    images = np.zeros((num, 8, 8, 3), np.uint8)
    ds = tf.data.Dataset.from_tensor_slices(
        {"file_name": names, "image": images, "label": labels.astype(np.int64)})
    if decoders and "image" in decoders:
      ds = ds.map(lambda ex: dict(ex, image=tf.io.encode_jpeg(ex["image"])))
    return ds

  cfg = common.data_config("imagenet2012", image_size=8, channels=3, num_classes=1000)
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    index = pipelines.canonical_indices(cfg, "validation")
  imagefolder = sorted(range(num), key=lambda k: (labels[k], names[k]))
  assert [int(index[k]) for k in imagefolder] == list(range(num))
