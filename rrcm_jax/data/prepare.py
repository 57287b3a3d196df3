r"""Builds a TFDS dataset offline: `python -m rrcm_jax.data.prepare fashion_mnist [--data_dir DIR]`.

After it, `tfds.load("fashion_mnist", data_dir=DIR)` (DIR defaults to TFDS's
own, ~/tensorflow_datasets or $TFDS_DATA_DIR) works without the internet.

Source: the Debian package `dataset-fashion-mnist`, /usr/share/datasets/fashion-mnist/*.gz.
Debian's gzip files hold the same compressed bytes as the originals but a
header without the original file name and time stamp, so TFDS rejects their
checksums. Restoring the header fields (the FNAME flag and name, and the
original MTIME) gives byte-identical originals; they are written to
`<DIR>/downloads/manual/` and checked against the sha256 TFDS records before
TFDS builds the dataset from them. A second run finds the dataset prepared
and does nothing. (MNIST has no Debian package; TFDS downloads it online.)
"""
import argparse
import hashlib
import os
import sys

# file name -> MTIME of the original gzip header (fashion-mnist release of Aug 2017).
_ORIGINAL_MTIMES = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": 1504176606,
        "train-labels-idx1-ubyte.gz": 1504176606,
        "t10k-images-idx3-ubyte.gz": 1504176627,
        "t10k-labels-idx1-ubyte.gz": 1504176627,
    },
}
_DEBIAN = {"fashion_mnist": ("/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist")}


def restore_gzip_header(data, original_name, mtime):
  """Debian gzip bytes -> the original file's bytes (FNAME flag + name, MTIME restored)."""
  if data[:3] != b"\x1f\x8b\x08":
    raise ValueError(f"{original_name}: not a gzip (deflate) file.")
  if data[3] & ~0x08:
    raise ValueError(f"{original_name}: unexpected gzip header flags {data[3]:#x}.")
  if data[3] & 0x08:  # already carries a name: drop it, then write the original one
    data = data[:10] + data[data.index(b"\x00", 10) + 1:]
  name = original_name[:-3] if original_name.endswith(".gz") else original_name
  return (data[:3] + bytes([0x08]) + mtime.to_bytes(4, "little") + data[8:10]
          + name.encode("latin-1") + b"\x00" + data[10:])


def restore_manual_files(name, source_dir, manual_dir, url_infos):
  """Writes the original .gz files into manual_dir; returns their paths. Raises on a bad sha256."""
  os.makedirs(manual_dir, exist_ok=True)
  written = []
  for info in url_infos.values():
    with open(os.path.join(source_dir, info.filename), "rb") as f:
      data = restore_gzip_header(f.read(), info.filename, _ORIGINAL_MTIMES[name][info.filename])
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.checksum:
      raise RuntimeError(f"{info.filename}: restored sha256 {digest} differs from TFDS's "
                         f"{info.checksum}; the Debian files are not the originals.")
    path = os.path.join(manual_dir, info.filename)
    with open(path + ".tmp", "wb") as f:
      f.write(data)
    os.replace(path + ".tmp", path)  # never a half-written file under the final name
    written.append(path)
  return written


def missing_data_message(name, source_dir, package, download_error=None):
  tried = (f" and TFDS's own download failed ({type(download_error).__name__})"
           if download_error is not None else "")
  return (f"Cannot prepare {name!r}: {source_dir}/*.gz not found{tried}; either run this command "
          f"on a machine with internet (TFDS then downloads it), or install the Debian package "
          f"with `apt-get install {package}` (needs root or sudo: `sudo apt-get install "
          f"{package}`) and run this command again.")


def download(builder):
  """TFDS's own download and preparation (needs internet); a seam tests replace."""
  builder.download_and_prepare()


def prepare(name, data_dir=None, source_dir=None, allow_download=True):
  """Builds TFDS dataset `name` in data_dir; returns a one-line summary.

  From the Debian files when they are installed; otherwise, with `allow_download`,
  through TFDS's own download (a machine with internet, no root needed).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from rrcm_jax.data import import_tensorflow  # pylint: disable=g-import-not-at-top
  import_tensorflow()
  if name not in _DEBIAN:
    raise ValueError(f"dataset {name!r} has no offline source; allowed: {sorted(_DEBIAN)}.")
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return f"{name} is already prepared in {builder.data_dir}; nothing to do."
  default_dir, package = _DEBIAN[name]
  source_dir = source_dir or default_dir
  url_infos = tfds.builder_cls(name).url_infos
  if not all(os.path.exists(os.path.join(source_dir, i.filename)) for i in url_infos.values()):
    if not allow_download:
      raise FileNotFoundError(missing_data_message(name, source_dir, package))
    try:
      download(builder)
    except Exception as e:  # pylint: disable=broad-except  (no network: DownloadError, OSError, ...)
      raise FileNotFoundError(missing_data_message(name, source_dir, package, e)) from e
    counts = {str(split): info.num_examples for split, info in builder.info.splits.items()}
    return f"{name} downloaded by TFDS and prepared in {builder.data_dir}: {counts}."
  root = data_dir or os.path.dirname(os.path.dirname(builder.data_dir))
  manual_dir = os.path.join(root, "downloads", "manual")
  restore_manual_files(name, source_dir, manual_dir, url_infos)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  counts = {str(split): info.num_examples for split, info in builder.info.splits.items()}
  return f"{name} prepared in {builder.data_dir} from {source_dir} (sha256 verified): {counts}."


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("name", choices=sorted(_DEBIAN), help="TFDS dataset to build offline")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's own)")
  parser.add_argument("--source_dir", default=None, help="folder of the Debian .gz files")
  parser.add_argument("--no_download", action="store_true",
                      help="never fall back to TFDS's own download")
  args = parser.parse_args(argv)
  try:
    print(prepare(args.name, args.data_dir, args.source_dir, not args.no_download))
  except (FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
