"""Writing result files so that a kill never leaves a half-written one."""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
  """Writes JSON through a temp file in the same folder + rename (atomic on POSIX)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=indent, sort_keys=True)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
