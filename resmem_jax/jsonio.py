"""Reading and writing state and result files: a kill never leaves a half-written one, files get
the user's umask, and any damaged file reads as one ``json.JSONDecodeError`` (a ``ValueError``)."""
from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
from typing import Any


def umask() -> int:
  """The process's umask (read without changing it where /proc allows)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
  os.umask(mask)
  return mask


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
  """Writes JSON through a temp file in the same folder + rename (atomic on POSIX).

  The file gets the permissions a plain ``open`` would give it (mkstemp's are 0600).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~umask())
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=indent, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def loads(text: str | bytes) -> Any:
  """``json.loads``, except that input nested too deeply for Python's parser (which raises
  RecursionError) is a ``json.JSONDecodeError`` too, like any other damaged JSON, so callers
  that set an unreadable cache aside, or name an unreadable file, do so for this one as well."""
  try:
    return json.loads(text)
  except RecursionError:
    if isinstance(text, bytes):
      text = text.decode("utf-8", "replace")
    raise json.JSONDecodeError(f"nested too deeply to read (more levels than Python's "
                               f"recursion limit of {sys.getrecursionlimit()})", text, 0) from None


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value in ``path``; OSError when it cannot be read, json.JSONDecodeError (a
  ValueError) when it is not JSON, nested too deeply included."""
  return loads(pathlib.Path(path).read_text())
