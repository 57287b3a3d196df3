"""rrcm_jax.data.prepare: the offline Fashion-MNIST build from the Debian package's files."""
import gzip
import hashlib
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from rrcm_jax.data import pipelines
from rrcm_jax.data import prepare


def test_restore_gzip_header_gives_back_the_original_bytes():
  buf = io.BytesIO()
  with gzip.GzipFile(filename="train-labels-idx1-ubyte", mode="wb", fileobj=buf, mtime=1504176606) as f:
    f.write(b"\x00\x00\x08\x01" + bytes(range(200)))
  original = buf.getvalue()
  assert original[3] == 0x08  # FNAME set
  name_end = original.index(b"\x00", 10) + 1
  debian = original[:3] + b"\x00" + b"\xed\x0a\xda\x5e" + original[8:10] + original[name_end:]
  assert prepare.restore_gzip_header(debian, "train-labels-idx1-ubyte.gz", 1504176606) == original
  assert gzip.decompress(debian) == gzip.decompress(original)
  with pytest.raises(ValueError, match="not a gzip"):
    prepare.restore_gzip_header(b"PK\x03\x04" + bytes(20), "x.gz", 0)


def test_missing_files_name_both_ways_to_get_the_data(tmp_path, capsys):
  code = prepare.main(["fashion_mnist", "--data_dir", str(tmp_path), "--source_dir", str(tmp_path),
                       "--no_download"])
  err = capsys.readouterr().err
  assert code == 1
  assert "internet" in err and "apt-get install dataset-fashion-mnist" in err and "root or sudo" in err
  assert err.count("\n") == 1


def test_without_debian_files_tfds_downloads(tmp_path, monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(prepare, "download", calls.append)
  code = prepare.main(["fashion_mnist", "--data_dir", str(tmp_path), "--source_dir", str(tmp_path)])
  assert code == 0 and len(calls) == 1 and calls[0].name == "fashion_mnist"
  assert "downloaded by TFDS" in capsys.readouterr().out


def test_failed_download_is_one_sentence_with_both_ways(tmp_path, monkeypatch, capsys):
  def offline(builder):
    raise OSError("Network is unreachable")
  monkeypatch.setattr(prepare, "download", offline)
  code = prepare.main(["fashion_mnist", "--data_dir", str(tmp_path), "--source_dir", str(tmp_path)])
  err = capsys.readouterr().err
  assert code == 1 and err.count("\n") == 1
  assert "download failed (OSError)" in err and "apt-get install dataset-fashion-mnist" in err


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  message = prepare.prepare("fashion_mnist", data_dir=str(data_dir))
  assert "sha256 verified" in message and "'train': 60000" in message and "'test': 10000" in message
  return data_dir


def test_manual_files_have_the_checksums_tfds_records(fashion_dir):
  infos = tfds.builder_cls("fashion_mnist").url_infos.values()
  for info in infos:
    data = (fashion_dir / "downloads" / "manual" / info.filename).read_bytes()
    assert hashlib.sha256(data).hexdigest() == info.checksum
    assert len(data) == info.size


def test_second_run_is_a_no_op(fashion_dir, capsys):
  assert prepare.main(["fashion_mnist", "--data_dir", str(fashion_dir)]) == 0
  assert "already prepared" in capsys.readouterr().out


def test_tfds_load_and_pipelines_read_the_built_dataset(fashion_dir):
  ds = tfds.load("fashion_mnist", split="test[:3]", data_dir=str(fashion_dir))
  first = next(iter(tfds.as_numpy(ds)))
  assert first["image"].shape == (28, 28, 1) and 0 <= first["label"] < 10
  cfg = common.data_config()  # fashion_mnist, 28x28x1
  cfg.data_dir = str(fashion_dir)
  cfg.train_split = "train[:256]"
  batch = next(pipelines.pretrain_batches(cfg, global_batch_size=32, seed=0))
  assert all(v.shape == (32, 28, 28, 1) and v.dtype == np.uint8 for v in batch.values())
  subset = pipelines.certification_subset(cfg, split="test[:100]", every=20)
  assert [i for i, _, _ in subset] == [0, 20, 40, 60, 80]
  np.testing.assert_array_equal(subset[0][1], first["image"])
  assert subset[0][2] == first["label"]
