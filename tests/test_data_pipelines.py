"""rrcm_jax.data.pipelines: shapes, determinism, exact resumption, eval padding, device prefetch."""
import itertools

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import common
from rrcm_jax.data import pipelines


def _synthetic(image_size=16, channels=3, train=20, test=13, cache=True):
  cfg = common.data_config("synthetic", image_size=image_size, channels=channels)
  cfg.synthetic_examples = {"train": train, "test": test}
  cfg.cache = cache
  return cfg


def _take(it, n):
  return list(itertools.islice(it, n))


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _pretrain(cfg, start_step=0, **kw):
  return pipelines.pretrain_batches(cfg, global_batch_size=8, seed=3, start_step=start_step, **kw)


@pytest.mark.parametrize("cache", [True, False])
def test_pretrain_three_steps_restart_three_steps_equals_six(cache):
  cfg = _synthetic(cache=cache)  # 20 examples, batch 8: steps cross epoch boundaries
  cfg.shuffle_buffer = 7         # the streaming path shuffles with a buffer
  six = _take(_pretrain(cfg), 6)
  _assert_same(_take(_pretrain(cfg), 3) + _take(_pretrain(cfg, start_step=3), 3), six)
  assert {k: (v.shape, v.dtype) for k, v in six[0].items()} == {
      k: ((8, 16, 16, 3), np.uint8) for k in ("x", "a1", "a2")}
  assert not np.array_equal(six[0]["a1"], six[0]["a2"])
  other_seed = _take(pipelines.pretrain_batches(cfg, global_batch_size=8, seed=4), 1)
  assert not np.array_equal(other_seed[0]["a1"], six[0]["a1"])


def test_pretrain_epochs_are_permutations():
  cfg = _synthetic(train=16)
  cfg.shuffle_buffer = 4
  batches = _take(pipelines.finetune_batches(cfg, split="train", global_batch_size=8, seed=0), 4)
  images = [b["image"].reshape(8, -1) for b in batches]
  epoch0 = {r.tobytes() for r in np.concatenate(images[:2])}
  epoch1 = {r.tobytes() for r in np.concatenate(images[2:])}
  assert len(epoch0) == 16 and epoch0 == epoch1  # every example once per epoch
  assert not np.array_equal(np.concatenate(images[:2]), np.concatenate(images[2:]))  # reshuffled


def test_pretrain_two_processes_read_their_own_halves():
  cfg = _synthetic(train=16)
  local = [_take(_pretrain(cfg, process_index=p, process_count=2), 2) for p in range(2)]
  assert local[0][0]["x"].shape == (4, 16, 16, 3)  # global 8 over 2 processes
  with pytest.raises(ValueError, match="global_batch_size=9"):
    pipelines.pretrain_batches(cfg, global_batch_size=9, seed=0, process_index=0, process_count=2)


@pytest.mark.parametrize("augment", ["none", "weak", "strong", "autoaug"])
def test_finetune_batches_shapes_and_resumption(augment):
  cfg = _synthetic(image_size=16)
  run = lambda start: pipelines.finetune_batches(cfg, split="train[:90%]", global_batch_size=6,
                                                 seed=1, start_step=start, augment=augment)
  four = _take(run(0), 4)
  _assert_same(_take(run(2), 2), four[2:])
  assert four[0]["image"].shape == (6, 16, 16, 3) and four[0]["image"].dtype == np.uint8
  assert four[0]["label"].dtype == np.int32


def test_finetune_rejects_unknown_augment():
  with pytest.raises(ValueError, match="augment='mixup'"):
    pipelines.finetune_batches(_synthetic(), split="train", global_batch_size=4, seed=0,
                               augment="mixup")


@pytest.mark.parametrize("count", [1, 2, 3])
def test_eval_batches_pad_so_every_example_counts_once(count):
  cfg = _synthetic(test=13)
  per_process = [list(pipelines.eval_batches(cfg, split="test", global_batch_size=count * 4,
                                             process_index=p, process_count=count))
                 for p in range(count)]
  assert len({len(b) for b in per_process}) == 1  # same number of batches everywhere
  indices, labels = [], {}
  for batches in per_process:
    for b in batches:
      assert b["image"].shape == (4, 16, 16, 3) and b["mask"].dtype == bool
      indices += list(b["index"][b["mask"]])
      assert np.all(b["index"][~b["mask"]] == -1)
      labels.update(zip(b["index"][b["mask"]], b["label"][b["mask"]]))
  assert sorted(indices) == list(range(13))
  again = list(pipelines.eval_batches(cfg, split="test", global_batch_size=4))
  _assert_same(again, per_process[0] if count == 1 else again)
  assert labels == {i: l for b in again for i, l in zip(b["index"][b["mask"]], b["label"][b["mask"]])}


def test_certification_subset_every_k_and_first_n():
  cfg = _synthetic(test=13)
  every = pipelines.certification_subset(cfg, split="test", every=5)
  assert [i for i, _, _ in every] == [0, 5, 10]
  assert every[0][1].shape == (16, 16, 3) and every[0][1].dtype == np.uint8
  first = pipelines.certification_subset(cfg, split="test", first=4)
  assert [i for i, _, _ in first] == [0, 1, 2, 3]
  np.testing.assert_array_equal(first[0][1], every[0][1])
  eval_images = next(pipelines.eval_batches(cfg, split="test", global_batch_size=13))
  np.testing.assert_array_equal(every[1][1], eval_images["image"][5])
  assert every[1][2] == eval_images["label"][5]
  for bad in (dict(), dict(every=2, first=3), dict(every=0)):
    with pytest.raises(ValueError, match="every"):
      pipelines.certification_subset(cfg, split="test", **bad)


def test_prefetch_to_device_builds_global_arrays():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  cfg = _synthetic(test=13)
  local = list(pipelines.eval_batches(cfg, split="test", global_batch_size=8))
  on_device = list(pipelines.prefetch_to_device(iter(local), sharding, size=2))
  assert len(on_device) == len(local) == 2
  for host, dev in zip(local, on_device):
    assert isinstance(dev["image"], jax.Array) and dev["image"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(dev["image"]), host["image"])
    np.testing.assert_array_equal(np.asarray(dev["index"]), host["index"])


@pytest.mark.parametrize("name,cache", [("cifar10", True), ("imagenet2012", False)])
def test_tfds_mock_pipelines(name, cache):
  cfg = common.data_config(name, image_size=32, channels=3, num_classes=1000)
  cfg.cache = cache
  cfg.shuffle_buffer = 5
  with tfds.testing.mock_data(num_examples=10):
    six = _take(_pretrain(cfg), 6)
    _assert_same(_take(_pretrain(cfg, start_step=4), 2), six[4:])
    assert six[0]["a2"].shape == (8, 32, 32, 3) and six[0]["a2"].dtype == np.uint8
    tune = _take(pipelines.finetune_batches(cfg, split="train", global_batch_size=4, seed=0,
                                            augment="strong"), 1)[0]
    assert tune["image"].shape == (4, 32, 32, 3)
    batches = list(pipelines.eval_batches(cfg, split="test", global_batch_size=4))
    assert sum(int(b["mask"].sum()) for b in batches) == 10 and len(batches) == 3
    assert pipelines.num_examples(cfg, "train") == 10


def test_grayscale_dataset_keeps_one_channel():
  cfg = _synthetic(image_size=28, channels=1)
  batch = next(_pretrain(cfg))
  assert all(v.shape == (8, 28, 28, 1) for v in batch.values())
