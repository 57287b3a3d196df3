"""An in-memory stand-in for gs:// under `etils.epath`, for tests of code that must work on
object stores: paths go through fsspec (as epath does without TensorFlow), objects live in
a dict, appending is refused (GCS objects cannot be appended to), and a builtin `open()`
of a gs:// path fails because no local file or folder of that name exists."""
import contextlib

import fsspec
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
  """fsspec's memory file system under the gs:// scheme, without append."""
  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    path = path.lstrip("/").rstrip("/")
    return "/" + path if path else ""

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError(f"object stores do not append: {path} opened with mode {mode!r}")
    return super()._open(path, mode, **kwargs)


@contextlib.contextmanager
def fake_gcs(monkeypatch):
  """Routes epath's gs:// paths to a fresh FakeGCS for the `with` block; yields it."""
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  FakeGCS.clear_instance_cache()
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()   # pylint: disable=protected-access
  try:
    yield FakeGCS()
  finally:
    epath_backend.fsspec_backend._get_filesystem.cache_clear()   # pylint: disable=protected-access
    FakeGCS.store.clear()
