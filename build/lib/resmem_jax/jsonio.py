"""Writing result files so that a kill never leaves a half-written one, with the user's umask."""
from __future__ import annotations

import json
import os
import pathlib
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
