"""The "did you mean" hint every error about an unknown name ends with (imports nothing of the
package, so any module can use it)."""
from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name, choices: Iterable) -> str:
  """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``name``, or ``""``."""
  close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
  return f" (did you mean {close[0]!r}?)" if close else ""
