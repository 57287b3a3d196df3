"""rrcm_jax.data.sources: per-process splits, synthetic, class folders, TFDS (mock_data)."""
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import common
from rrcm_jax.data import sources

tf = sources.tf


def _synthetic(image_size=16, channels=3, train=50, test=13):
  cfg = common.data_config("synthetic", image_size=image_size, channels=channels)
  cfg.synthetic_examples = {"train": train, "test": test}
  return cfg


def _indices(src):
  return [int(r["index"]) for r in src.records]


@pytest.mark.parametrize("split,size,expected", [
    ("train", 101, range(101)), ("train[:90%]", 101, range(91)), ("train[90%:]", 101, range(91, 101)),
    ("train[5:17]", 101, range(5, 17)), ("train", 3, range(3))])
@pytest.mark.parametrize("count", [2, 3])
def test_process_ranges_are_disjoint_and_cover_the_split(split, size, expected, count):
  seen = []
  for p in range(count):
    for name, start, stop in sources.process_ranges(split, {"train": size}, p, count):
      assert name == "train"
      seen += range(start, stop)
  assert sorted(seen) == list(expected)
  assert len(set(seen)) == len(seen)


def test_split_names_and_bad_spec():
  assert sources.split_names("test+train[:9]") == ["test", "train"]
  with pytest.raises(ValueError, match="split="):
    sources.split_names("train[:9] minus")


def test_synthetic_two_processes_disjoint_covering_and_deterministic():
  cfg = _synthetic()
  parts = [sources.source(cfg, "train[:80%]", process_index=p, process_count=2) for p in range(2)]
  assert [p.num_examples for p in parts] == [20, 20]
  assert _indices(parts[0]) + _indices(parts[1]) == list(range(40))
  first = parts[1].decode(parts[1].lookup(tf.constant(3, tf.int64)))
  again = parts[1].decode(parts[1].lookup(tf.constant(3, tf.int64)))
  np.testing.assert_array_equal(first["image"], again["image"])
  assert first["image"].shape == (16, 16, 3) and first["image"].dtype == tf.uint8
  assert sources.num_examples(cfg, "train[:80%]") == 40 and sources.num_examples(cfg, "test") == 13


def test_synthetic_images_carry_their_class():
  cfg = _synthetic(image_size=24, train=200)
  src = sources.source(cfg, "train", process_index=0, process_count=1)
  examples = [src.decode(r) for r in src.records]
  labels = np.array([int(e["label"]) for e in examples])
  images = np.stack([e["image"].numpy() for e in examples]).astype(np.float32)
  assert sorted(set(labels)) == list(range(10))
  means = np.stack([images[labels == c].mean(0) for c in range(10)])
  # Class means differ far more than the images of a class differ from their mean at a pixel.
  assert np.abs(means[:, None] - means[None]).mean() > 10


def test_synthetic_unknown_split_is_rejected():
  with pytest.raises(ValueError, match="synthetic split 'validation'"):
    sources.source(_synthetic(), "validation")


def _write_folder(root, counts, size=(20, 14)):
  """root/<split>/<class>/<i>.(png|jpg): counts = {split: {class: n}}."""
  rng = np.random.default_rng(0)
  for split, classes in counts.items():
    for cls, n in classes.items():
      d = root / split / cls
      d.mkdir(parents=True)
      for i in range(n):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
  (root / "train" / "notes.txt").write_text("not an image")


def test_folder_source_classes_splits_and_processes(tmp_path):
  _write_folder(tmp_path, {"train": {"cat": 3, "dog": 4}, "val": {"cat": 2, "dog": 1, "emu": 2}})
  cfg = common.data_config("folder", image_size=8, channels=3)
  cfg.folder = str(tmp_path)
  cfg.cache = False
  assert sources.num_examples(cfg, "train") == 7 and sources.num_examples(cfg, "val") == 5
  src = sources.source(cfg, "val", process_index=0, process_count=1)
  assert [int(r["label"]) for r in src.records] == [0, 0, 1, 2, 2]  # classes over all splits, sorted
  image = src.decode(next(iter(src.records)))["image"]
  assert image.shape == (14, 20, 3) and image.dtype == tf.uint8
  parts = [sources.source(cfg, "train", process_index=p, process_count=2) for p in range(2)]
  assert _indices(parts[0]) + _indices(parts[1]) == list(range(7))
  cfg.cache = True  # images of one size: decoded into memory, random access
  cached = sources.source(cfg, "train", process_index=1, process_count=2)
  np.testing.assert_array_equal(cached.decode(cached.lookup(tf.constant(0, tf.int64)))["image"],
                                parts[1].decode(parts[1].lookup(tf.constant(0, tf.int64)))["image"])
  with pytest.raises(ValueError, match="split 'test'"):
    sources.num_examples(cfg, "test")


def test_folder_without_root_is_rejected():
  with pytest.raises(ValueError, match="data.folder"):
    sources.num_examples(common.data_config("folder"), "train")


@pytest.mark.parametrize("name,cache", [("cifar10", True), ("imagenet2012", False)])
def test_tfds_mock_sources(name, cache):
  cfg = common.data_config(name, image_size=32, channels=3, num_classes=10)
  cfg.cache = cache
  with tfds.testing.mock_data(num_examples=12):
    parts = [sources.source(cfg, "train", process_index=p, process_count=2) for p in range(2)]
    assert [p.num_examples for p in parts] == [6, 6]
    assert _indices(parts[0]) + _indices(parts[1]) == list(range(12))
    assert (parts[0].lookup is not None) == cache
    image = parts[0].decode(next(iter(parts[0].records)))["image"]
    assert image.dtype == tf.uint8 and image.shape[-1] == 3


def test_unknown_dataset_name_is_rejected():
  with pytest.raises(ValueError, match="data.name='no_such_dataset'"):
    sources.num_examples(common.data_config("no_such_dataset"), "train")
