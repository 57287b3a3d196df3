"""Text files on local disks and object stores alike, through `etils.epath`.

Certification logs, their counts and run records are appended one line at a
time and must survive a kill at any moment. Local files are appended, flushed
and fsynced. Object stores (gs://, s3://) cannot append: an `Appender` there
keeps the file's text and writes the whole object again on every append; an
object write is atomic (a reader sees the previous or the new version, never a
torn line), and rewriting costs O(size) per line, small next to what a line
records (an image's certification). `write_whole` replaces a file atomically.
"""
import os

from etils import epath


def is_local(path):
  """True for a local path, False for an object store URI (gs://, s3://, ...)."""
  return "://" not in str(path)


def nonempty(path):
  """True when a file exists at `path` and holds at least one byte."""
  path = epath.Path(path)
  return path.exists() and path.stat().length > 0


def read_text(path):
  """The file's text (undecodable bytes replaced: a log cut short mid-character still reads)."""
  return epath.Path(path).read_bytes().decode(errors="replace")


def write_whole(path, data):
  """Replaces the file at `path` by `data` (str or bytes) atomically: a temporary file and
  a rename on local disks; one object write on object stores (atomic there; their renames
  are copies)."""
  path = epath.Path(path)
  data = data.encode() if isinstance(data, str) else data
  if not is_local(path):
    path.write_bytes(data)
    return
  temporary = path.parent / (path.name + ".writing")
  with temporary.open("wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  temporary.replace(path)


class Appender:
  """Appends text to a file and makes it durable at once: append, flush and fsync on local
  disks; on object stores the whole text is kept here and written again (module docstring)."""

  def __init__(self, path):
    self.path = epath.Path(path)
    if is_local(path):   # unbuffered: a failed write (full disk) leaves nothing pending
      self._file, self._text = open(self.path, "ab", buffering=0), None
    else:
      self._file = None
      self._text = read_text(path) if self.path.exists() else ""

  def append(self, text):
    if self._file is None:
      self._text += text
      self.path.write_text(self._text)
      return
    data = text.encode()
    while data:   # a raw write may take part of the data; the next raises (e.g. ENOSPC)
      data = data[self._file.write(data):]
    os.fsync(self._file.fileno())

  def close(self):
    if self._file is not None:
      self._file.close()
