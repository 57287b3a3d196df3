"""rrcm_jax.data.{device, device_augment, arrays}: parity with the tf.image ops, order, resume, sharding.

The JAX ops are functions of the same per-example uniforms u as `augment`'s
tf.image ops, so each is compared with its TensorFlow twin given the same u
(float pixels to 1e-5; uint8 exactly or, after a bilinear crop, within 1 where
a value sits on a rounding boundary). conftest.py gives 8 CPU devices.
"""
import gzip
import json
import os
import pickle
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import subprocess_xla_flags

from rrcm_jax import parallel
from rrcm_jax.data import arrays
from rrcm_jax.data import device
from rrcm_jax.data import device_augment as D

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, size, channels, seed=0):
  """Smooth gradients plus noise: asymmetric (flips show) and not constant."""
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0, 1, size)[None, None, :, None] * np.linspace(0.2, 1, size)[None, :, None, None]
  noise = rng.uniform(0, 0.4, (n, size, size, channels))
  return np.clip((ramp + noise) * 180, 0, 255).astype(np.uint8)


def _uniforms(n, seed=1):
  return np.random.default_rng(seed).uniform(size=(n, D.NUM_UNIFORMS)).astype(np.float32)


@pytest.fixture(scope="module")
def A():
  pytest.importorskip("tensorflow")
  from rrcm_jax.data import augment  # pylint: disable=g-import-not-at-top
  return augment


# ------------------------------------------------------------------ parity with tf.image


def test_uniform_slots_match_augment(A):
  assert D.U == A.U and D.NUM_UNIFORMS == A.NUM_UNIFORMS
  assert [D.blur_kernel_size(s) for s in (28, 32, 224)] == [A.blur_kernel_size(s) for s in (28, 32, 224)]


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.4, 1.0), (1.0, 1.0)])
def test_crop_box_equals_tf(A, scale):
  u = _uniforms(256)
  u[:8, D.U["ratio"]] = 0.0          # full area at aspect 3/4 never fits: the fallback box
  want = A.crop_box(A.tf.constant(u), 28, 28, scale)
  got = jax.vmap(lambda v: D.crop_box(v, 28, 28, scale))(u)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(np.asarray(g), w.numpy())


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_resized_crop_equals_tf(A, monkeypatch, channels, size):
  images, u = _images(48, size, channels), _uniforms(48)
  crop = jax.jit(jax.vmap(lambda im, v: D.resized_crop_float(im, D.crop_box(v, size, size), size)))
  got = np.asarray(crop(images, u))
  monkeypatch.setattr(A, "to_uint8", lambda x: x)       # the tf op's float result, before rounding
  want = np.stack([A.resized_crops(A.tf.constant(im), A.tf.constant(v[None]), size)[0].numpy()
                   for im, v in zip(images, u)])
  np.testing.assert_allclose(got, want, atol=1e-5)
  monkeypatch.undo()
  want_u8 = np.stack([A.resized_crops(A.tf.constant(im), A.tf.constant(v[None]), size)[0].numpy()
                      for im, v in zip(images, u)])
  diff = np.abs(np.asarray(D.to_uint8(got)).astype(int) - want_u8.astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def _tf_ops(A):
  return {"flip": (A.flip, D.flip),
          "color_jitter": (A.color_jitter, D.color_jitter),
          "random_grayscale": (A.random_grayscale, D.random_grayscale),
          "gaussian_blur_p1": (lambda x, u: A.gaussian_blur(x, u, 1.0), lambda x, u: D.gaussian_blur(x, u, 1.0)),
          "gaussian_blur_p0.1": (lambda x, u: A.gaussian_blur(x, u, 0.1), lambda x, u: D.gaussian_blur(x, u, 0.1)),
          "solarize": (lambda x, u: A.solarize(x, u, 0.5), lambda x, u: D.solarize(x, u, 0.5))}


@pytest.mark.parametrize("op", ["flip", "color_jitter", "random_grayscale", "gaussian_blur_p1",
                                "gaussian_blur_p0.1", "solarize"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_photometric_op_equals_tf(A, op, channels, size):
  x, u = _images(64, size, channels).astype(np.float32) / 255.0, _uniforms(64)
  tf_op, jax_op = _tf_ops(A)[op]
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(jax_op))(x, u)),
                             tf_op(A.tf.constant(x), A.tf.constant(u)).numpy(), atol=1e-5)


def test_adjust_hue_equals_tf_at_every_hue_sector(A):
  rgb = np.random.default_rng(3).uniform(size=(8, 8, 3)).astype(np.float32)
  rgb[0, :3] = [[0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 0.2, 0.2]]  # gray, black, pure hue
  # hue 0 shifted by a tiny negative delta wraps to exactly 1.0: the kernel's missing case
  for delta in (-0.5, -0.1, -1e-9, 0.0, 0.07, 0.33, 0.5):
    np.testing.assert_allclose(np.asarray(D.adjust_hue(rgb, delta)),
                               A.tf.image.adjust_hue(rgb, delta).numpy(), atol=1e-5)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_pretrain_views_equal_tf(A, channels, size):
  """Whole views: the same crops (tf's) through both photometric chains, and x exactly."""
  images, u = _images(32, size, channels), np.stack([_uniforms(3, seed=s) for s in range(32)])
  crops = [A.resized_crops(A.tf.constant(im), A.tf.constant(v[1:]), size) for im, v in zip(images, u)]
  batch = {"x": A.tf.constant(images), "a1": A.tf.stack([c[0] for c in crops]),
           "a2": A.tf.stack([c[1] for c in crops]), "u": A.tf.constant(u)}
  want = {k: v.numpy() for k, v in A.pretrain_photometry(batch).items()}
  views = jax.jit(jax.vmap(D.pretrain_views_from_uniforms))(images, u)
  np.testing.assert_array_equal(np.asarray(views["x"]), want["x"])
  for name, k, blur_p, sol_p in (("a1", 1, 1.0, 0.0), ("a2", 2, 0.1, 0.2)):
    got = jax.vmap(lambda c, v: D.strong_view(c, v[k], blur_p, sol_p))(batch[name].numpy(), u)  # pylint: disable=cell-var-from-loop
    diff = np.abs(np.asarray(got).astype(int) - want[name].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005, name
    crop_diff = np.abs(np.asarray(views[name]).astype(int) - want[name].astype(int))
    assert np.median(crop_diff) == 0, name       # own crops too: equal but for rounding ripples


@pytest.mark.parametrize("augment", ["none", "weak", "strong"])
def test_finetune_view_equals_tf(A, augment):
  images = _images(16, 32, 3)
  for i, image in enumerate(images):
    seed = A.tf.constant([5, i], A.tf.int64)
    want = A.finetune_view(A.tf.constant(image), seed, 32, augment).numpy()
    got = np.asarray(D.finetune_view_from_uniforms(image, A.uniforms(seed)[0].numpy(), augment))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_autoaug_is_refused_in_one_sentence():
  data = device.DeviceData(_images(16, 8, 1), np.arange(16), parallel.make_mesh(), seed=0)
  with pytest.raises(ValueError, match="tfdata"):
    data.finetune_batches(0, 8, "autoaug")


# ------------------------------------------------------------------ distributions


def test_crop_areas_and_flip_rate_follow_the_parameters():
  keys = jax.random.split(jax.random.key(0), 4000)
  u = jax.vmap(lambda k: jax.random.uniform(k, (D.NUM_UNIFORMS,)))(keys)
  _, _, h, w = jax.vmap(lambda v: D.crop_box(v, 32, 32))(u)
  frac = np.asarray(h * w) / 32 ** 2
  assert frac.min() >= 0.06 and frac.max() <= 1.0
  # area ~ U[0.08, 1] (mean 0.54), less the boxes that do not fit and fall back to the whole image
  assert 0.45 < frac.mean() < 0.6
  data = device.DeviceData(_images(512, 16, 1), np.arange(512), parallel.make_mesh(), seed=1)
  batch = next(data.finetune_batches(0, 512, "weak"))
  originals = _images(512, 16, 1)[np.asarray(batch["label"])]
  flipped = np.all(np.asarray(batch["image"]) == originals[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(np.asarray(batch["image"]) == originals, axis=(1, 2, 3))
  assert np.all(flipped | kept) and abs(flipped.mean() - 0.5) < 0.07


# ------------------------------------------------------------------ order, resume, sharding


def _pretrain(data, start, n, batch=32, scale=(0.08, 1.0)):
  it = data.pretrain_batches(start, batch, crop_scale=scale)
  return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


def test_epochs_cover_every_example_once_and_cross_epoch_boundaries():
  n, batch = 40, 16
  data = device.DeviceData(_images(n, 8, 1), np.arange(n), parallel.make_mesh(), seed=2)
  it = data.finetune_batches(0, batch, "none")
  labels = np.concatenate([np.asarray(next(it)["label"]) for _ in range(5)])   # 80 = 2 epochs
  assert sorted(labels[:n]) == list(range(n)) and sorted(labels[n:]) == list(range(n))
  assert list(labels[:n]) != list(labels[n:])          # each epoch its own permutation
  images = np.asarray(next(data.finetune_batches(0, batch, "none"))["image"])
  np.testing.assert_array_equal(images, _images(n, 8, 1)[labels[:batch]])


def test_resume_sees_the_batches_of_an_uninterrupted_run():
  data = device.DeviceData(_images(50, 12, 3), np.arange(50), parallel.make_mesh(), seed=4)
  full = _pretrain(data, 0, 6)                          # 6 x 32 positions: crosses 3 epochs
  resumed = _pretrain(data, 4, 2)
  for a, b in zip(full[4:], resumed):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(full[0]["a1"], full[0]["a2"])
  assert not np.array_equal(full[0]["a1"], full[1]["a1"])


def test_batches_do_not_depend_on_the_device_count():
  assert jax.device_count() == 8
  images, labels = _images(100, 12, 3), np.arange(100) % 7
  many = device.DeviceData(images, labels, parallel.make_mesh(), seed=9)
  one = device.DeviceData(images, labels, parallel.make_mesh(jax.devices()[:1]), seed=9)
  assert many.images.sharding.spec == parallel.data_sharding(many.mesh).spec
  for a, b in zip(_pretrain(many, 2, 2, scale=(0.3, 0.9)), _pretrain(one, 2, 2, scale=(0.3, 0.9))):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  a = jax.tree.map(np.asarray, next(many.finetune_batches(3, 48, "strong")))
  b = jax.tree.map(np.asarray, next(one.finetune_batches(3, 48, "strong")))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  for a, b in zip(many.eval_batches(64), one.eval_batches(64)):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


def test_eval_batches_in_split_order_with_padding():
  images, labels = _images(20, 8, 1), np.arange(20) % 3
  data = device.DeviceData(images, labels, parallel.make_mesh(), seed=0, index=np.arange(100, 120))
  batches = [jax.tree.map(np.asarray, b) for b in data.eval_batches(16)]
  assert len(batches) == 2
  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  np.testing.assert_array_equal(cat["image"][:20], images)
  assert cat["mask"].sum() == 20 and not cat["mask"][20:].any()
  np.testing.assert_array_equal(cat["index"], list(range(100, 120)) + [-1] * 12)
  np.testing.assert_array_equal(cat["label"], list(labels) + [0] * 12)
  assert (cat["image"][20:] == 0).all() and cat["label"].dtype == np.int32


def test_bad_batches_are_refused():
  data = device.DeviceData(_images(20, 8, 1), np.arange(20), parallel.make_mesh(), seed=0)
  with pytest.raises(ValueError, match="multiple of the device count"):
    data.pretrain_batches(0, 12)
  with pytest.raises(ValueError, match="exceeds"):
    data.pretrain_batches(0, 24)
  with pytest.raises(ValueError, match="uint8"):
    device.DeviceData(np.zeros((4, 8, 8, 1), np.float32), np.arange(4), parallel.make_mesh(), seed=0)


def test_imports_and_runs_without_tensorflow():
  code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
          "import numpy as np\n"
          "from rrcm_jax import parallel\n"
          "from rrcm_jax.data import device, arrays\n"
          "d = device.DeviceData(np.zeros((8, 8, 8, 3), np.uint8), np.arange(8), parallel.make_mesh(), 0)\n"
          "b = next(d.pretrain_batches(0, 8)); assert b['a1'].shape == (8, 8, 8, 3)\n"
          "assert sys.modules['tensorflow'] is None\n")
  env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]


# ------------------------------------------------------------------ arrays


def _write_idx(path, array, compress):
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  data = header + array.astype(np.uint8).tobytes()
  with (gzip.open(path + ".gz", "wb") if compress else open(path, "wb")) as f:
    f.write(data)


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(name="custom", arrays=None, data_dir=None, image_size=8,
                                             channels=1, num_classes=10), **kw))


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder_keeps_file_order(tmp_path, compress):
  train, test = _images(30, 8, 1)[..., 0], _images(10, 8, 1, seed=5)[..., 0]
  for stem, arr in (("train-images-idx3-ubyte", train), ("train-labels-idx1-ubyte", np.arange(30) % 10),
                    ("t10k-images-idx3-ubyte", test), ("t10k-labels-idx1-ubyte", np.arange(10)[::-1])):
    _write_idx(str(tmp_path / stem), np.asarray(arr), compress)
  cfg = _cfg(arrays=str(tmp_path))
  part = arrays.load_split(cfg, "train[90%:]")
  np.testing.assert_array_equal(part.images[..., 0], train[27:])
  np.testing.assert_array_equal(part.index, [27, 28, 29])
  both = arrays.load_split(cfg, "test[:2]+train[:1]")
  np.testing.assert_array_equal(both.labels, [9, 8, 0])
  subset = arrays.certification_subset(cfg, split="test", every=4)
  assert [i for i, _, _ in subset] == [0, 4, 8] and subset[1][2] == 5


def test_cifar_folder_and_npz(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  rng = np.random.default_rng(0)
  batches = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batches[name] = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                     b"labels": list(rng.integers(0, 10, 4))}
    with open(folder / name, "wb") as f:
      pickle.dump(batches[name], f)
  cfg = _cfg(arrays=str(folder), image_size=32, channels=3)
  train = arrays.load_split(cfg, "train")
  assert train.images.shape == (20, 32, 32, 3)
  np.testing.assert_array_equal(train.images[4, :, :, 1], batches["data_batch_2"][b"data"][0, 1024:2048].reshape(32, 32))
  np.testing.assert_array_equal(train.labels[-4:], batches["data_batch_5"][b"labels"])
  path = str(tmp_path / "d.npz")
  np.savez(path, x_train=train.images, y_train=train.labels, x_test=train.images[:3], y_test=train.labels[:3])
  npz = arrays.load_split(_cfg(arrays=path, image_size=32, channels=3), "test")
  np.testing.assert_array_equal(npz.images, train.images[:3])
  with pytest.raises(ValueError, match="image_size"):
    arrays.load_split(_cfg(arrays=path), "test")


@pytest.mark.parametrize("spec", ["train", "train[:90%]", "train[90%:]", "test[:500]", "train[-7:]",
                                  "test+train[:33%]", "train[12:40]", "train[33.3%:66.7%]"])
def test_split_ranges_resolve_as_tfds(spec):
  pytest.importorskip("tensorflow_datasets")
  from rrcm_jax.data import sources  # pylint: disable=g-import-not-at-top
  sizes = {"train": 60_000, "test": 10_000}
  want = [(n, a, b) for n, a, b in sources.process_ranges(spec, sizes, 0, 1)]
  assert arrays.split_ranges(spec, sizes) == want


def test_debian_fashion_mnist_loads_in_idx_order():
  if not os.path.exists(os.path.join(arrays.DEBIAN_FOLDERS["fashion_mnist"], "train-images-idx3-ubyte.gz")):
    pytest.skip("the Debian package dataset-fashion-mnist is not installed")
  cfg = _cfg(name="fashion_mnist", image_size=28)
  assert arrays.source_of(cfg)[0] == "idx"
  test = arrays.load_split(cfg, "test")
  assert test.images.shape == (10_000, 28, 28, 1) and np.bincount(test.labels).tolist() == [1000] * 10
  assert test.labels[:5].tolist() == [9, 2, 1, 1, 6]   # the first t10k labels as the dataset documents


def test_config_data_serves_the_trainers_interface(tmp_path):
  rng = np.random.default_rng(0)
  path = str(tmp_path / "d.npz")
  np.savez(path, x_train=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y_train=np.arange(40) % 10,
           x_test=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8), y_test=np.arange(12) % 10)
  config = ml_collections.ConfigDict(dict(
      data=_cfg(arrays=path, train_split="train[:75%]", pretrain_crop_scale=(0.35, 1.0)),
      seed=3, batch_size=16, eval_batch_size=8, augment="weak"))
  data = device.ConfigData(config, parallel.make_mesh())
  assert data.num_train() == 30
  views = next(data.pretrain(5))
  assert set(views) == {"x", "a1", "a2"} and views["a1"].shape == (16, 8, 8, 1)
  batch = next(data.train(0))
  assert batch["image"].sharding.spec == parallel.data_sharding(data.mesh).spec
  assert int(np.max(np.asarray(batch["label"]))) < 10
  evals = list(data.evaluate("test"))
  assert len(evals) == 2 and int(np.sum([np.asarray(b["mask"]).sum() for b in evals])) == 12


@pytest.mark.slow
def test_input_device_benchmark_quick(tmp_path):
  """In a child process on one CPU device: tf.data's threads beside collectives over
  8 simulated devices can stall XLA:CPU's rendezvous (see conftest.py)."""
  pytest.importorskip("tensorflow")
  out = tmp_path / "b.json"
  env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  run = subprocess.run([sys.executable, "-m", "benchmarks.input_device", "--quick", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  row = json.loads(out.read_text())["rows"][0]
  assert row["tfdata"] > 0 and row["device"] > 0
  assert row["ratio"] == pytest.approx(row["device"] / row["tfdata"], abs=0.01)
