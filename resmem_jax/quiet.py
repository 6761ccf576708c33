"""Library chatter (ScaNN's native logs, TFDS's preparation messages) is hidden unless asked for.

Some libraries write to the process's stdout / stderr directly (ScaNN's C++ code; TFDS's prints
while it prepares a data set), which no log level reaches. They run inside :func:`hidden_output`,
which sends both streams to /dev/null for the duration, unless the environment variable
``RESMEM_VERBOSE`` is set (the command-line tools set it with ``--verbose``).
"""
from __future__ import annotations

import contextlib
import os
import sys

VERBOSE_ENV = "RESMEM_VERBOSE"


def verbose() -> bool:
  return bool(os.environ.get(VERBOSE_ENV))


@contextlib.contextmanager
def hidden_output():
  """File descriptors 1 and 2 to /dev/null for the duration (unless :func:`verbose`)."""
  if verbose():
    yield
    return
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(1), os.dup(2)]
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    yield
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    for fd in saved + [devnull]:
      os.close(fd)
