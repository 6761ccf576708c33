"""One writer per workdir: an ``fcntl`` lock on ``WORKDIR/run.lock`` held for a run's life.

Two runs in one workdir would write the same checkpoints, memory and metrics at once. The second
one refuses at once, in one line naming the holder (pid, host, start time) read from the lock
file. The operating system releases the lock when its process ends, however it ends, so a killed
run never leaves a stale lock (the file stays; only the lock on it counts).

A job of several processes (multi-host) locks one file per process: process 0 ``run.lock``,
process I ``run.process_I.lock``. The processes of one job never block each other, and every
process of a second job in the same workdir meets its counterpart's lock and refuses on its own,
so none of them is left waiting in a collective. Within one process the lock is re-entrant (the
engine holds it across training, which takes it too).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import time

from resmem_jax import jsonio
from resmem_jax.training import provenance

LOCK_FILE = "run.lock"
# Seconds a refused run waits for the holder's details to appear in the file (written just after
# the lock is taken).
_DETAILS_WAIT_S = 1.0
_held: dict[str, list] = {}  # lock file (real path) -> [fd, depth]


class WorkdirInUse(provenance.WorkdirError):
  """Another run holds the workdir."""


def lock_path(workdir: pathlib.Path, process_index: int = 0) -> pathlib.Path:
  return workdir / (LOCK_FILE if process_index == 0 else f"run.process_{process_index}.lock")


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, process_index: int = 0):
  """Holds WORKDIR's lock (creating the workdir) for the ``with`` block; WorkdirInUse when another
  run holds it."""
  workdir = pathlib.Path(workdir)
  path = lock_path(workdir, process_index)
  workdir.mkdir(parents=True, exist_ok=True)
  key = os.path.realpath(path)
  if key in _held:
    _held[key][1] += 1
    try:
      yield
    finally:
      _held[key][1] -= 1
    return
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise WorkdirInUse(f"{workdir} is in use by another run ({_holder(path)}): one run per "
                       "workdir; wait for it to finish, or use another --workdir") from None
  except BaseException:
    os.close(fd)
    raise
  try:
    details = {"pid": os.getpid(), "host": socket.gethostname(),
               "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(details) + "\n").encode(), 0)
    _held[key] = [fd, 1]
    yield
  finally:
    _held.pop(key, None)
    os.close(fd)  # releases the lock


def _holder(path: pathlib.Path) -> str:
  """"pid P on host H since T" from the lock file (written by its holder just after locking)."""
  deadline = time.monotonic() + _DETAILS_WAIT_S
  while True:
    try:
      details = jsonio.loads(path.read_text())
      return f"pid {details['pid']} on host {details['host']} since {details['started']}"
    except (OSError, ValueError, KeyError, TypeError):
      if time.monotonic() > deadline:
        return f"its details in {path} cannot be read"
      time.sleep(0.05)
