"""Replacing a folder so that a kill at any instant leaves the old or the new one.

:func:`replace_folder` has the caller write the new contents into a sibling
``.<name>.tmp-<id>``, fsyncs every file and folder in it, then swaps: ``path`` ->
``.<name>.old-<id>``, the new copy -> ``path``, fsync of the parent, and deletes the old copy
(renamed to ``.<name>.del-<id>`` first, so that a partly deleted copy is never taken for a
complete one). A kill between the two renames leaves ``path`` missing: the next save or load
(:func:`restore`) renames the complete copy back, the new one if complete, else the old. The next
save deletes whatever killed saves left beside ``path``: those sibling folders of ``path`` only,
never anything else.

Every step that renames or deletes runs under an exclusive ``fcntl.flock`` on the sibling file
``.<name>.lock`` (deleted on release), so two processes saving the same path take turns instead of
deleting each other's work; a load holds the same lock shared (:func:`reading`), so it never reads
a folder that a save is swapping out. Folders are made with ``os.mkdir`` (and the caller makes files with
``open``), so permissions follow the umask like any other file (``tempfile.mkdtemp`` gives 0700).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import time
from typing import Callable, Iterator

# A folder path as the public functions take it (str or pathlib.Path); inside, always str.
StrPath = str | os.PathLike[str]


def replace_folder(path: StrPath, write: Callable[[str], object],
                   check_replaceable: Callable[[str], None],
                   is_complete: Callable[[str], bool]) -> None:
  """Replaces folder ``path`` by what ``write(new_folder)`` writes, atomically as seen after a kill.

  ``check_replaceable(path)`` raises (ValueError) when ``path`` must not be replaced; it runs
  before anything is created, and again under the lock. ``is_complete(folder)`` says whether a
  copy left by a killed save is whole (it chooses the copy :func:`restore` puts back).
  """
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  check_replaceable(path)  # a refused path gets nothing created beside it
  os.makedirs(parent, exist_ok=True)
  with _locked(path):
    _recover(path, is_complete)
    check_replaceable(path)
    new = _sibling(path, "tmp")
    os.mkdir(new)
    old = None
    try:
      write(new)
      _fsync_tree(new)
      if os.path.lexists(path):
        old = _sibling(path, "old")
        os.rename(path, old)
      os.rename(new, path)
      _fsync(parent, directory=True)
    except BaseException:
      if old is not None and not os.path.lexists(path):
        os.rename(old, path)
        old = None
      if os.path.lexists(new):
        _discard(path, new)
      raise
    if old is not None:
      _discard(path, old)


def interrupted(path: StrPath) -> bool:
  """Whether folders of a save of ``path`` (under way, or killed) lie beside it."""
  return bool(_leftovers(os.path.abspath(os.fspath(path))))


def restore(path: StrPath, is_complete: Callable[[str], bool]) -> None:
  """Puts back the complete copy a killed save left beside a missing ``path`` and deletes the
  rest (waiting for a save under way to finish)."""
  path = os.path.abspath(os.fspath(path))
  with _locked(path):
    _recover(path, is_complete)


def _recover(path: str, is_complete: Callable[[str], bool]) -> None:
  """Under the lock: the complete copy back to a missing ``path``; the other leftovers deleted."""
  leftovers = _leftovers(path)
  if not os.path.lexists(path):
    # A kill between the swap's renames leaves the new copy and the old: newest first, new first.
    copies = sorted((c for c in leftovers if c[1] != "del"), key=lambda c: (c[1] != "tmp", -c[2]))
    for folder, _, _ in copies:
      if is_complete(folder):
        os.rename(folder, path)
        _fsync(os.path.dirname(path), directory=True)
        leftovers = [c for c in leftovers if c[0] != folder]
        break
  for folder, _, _ in leftovers:
    _discard(path, folder)


def is_own_entry(path: StrPath, name: str) -> bool:
  """Whether ``name`` (an entry of ``path``'s parent) is this module's lock file or a copy of a
  save of ``path``: debris a killed save leaves, never a user's file."""
  base = os.path.basename(os.path.abspath(os.fspath(path)))
  return name == f".{base}.lock" or bool(re.fullmatch(
      rf"\.{re.escape(base)}\.(tmp|old|del)-[0-9a-f]+-[0-9]+-[0-9a-f]+", name))


def discard(path: StrPath) -> None:
  """Deletes ``path``, a folder this library wrote (a memory unit it replaces by another layout):
  renamed to a ``del`` sibling first, so a kill midway never leaves a partial copy at ``path``."""
  path = os.path.abspath(os.fspath(path))
  with _locked(path):
    _discard(path, path)


def _sibling(path: str, kind: str) -> str:
  parent, name = os.path.split(path)
  unique = f"{time.time_ns():x}-{os.getpid()}-{secrets.token_hex(4)}"
  return os.path.join(parent, f".{name}.{kind}-{unique}")


def _leftovers(path: str) -> list[tuple[str, str, int]]:
  """``(folder, kind, time)`` of this module's sibling folders of ``path``."""
  parent, name = os.path.split(path)
  pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old|del)-([0-9a-f]+)-[0-9]+-[0-9a-f]+")
  found: list[tuple[str, str, int]] = []
  try:
    entries = os.scandir(parent)
  except FileNotFoundError:
    return found
  with entries:
    for entry in entries:
      match = pattern.fullmatch(entry.name)
      if match and entry.is_dir(follow_symlinks=False):
        found.append((entry.path, match.group(1), int(match.group(2), 16)))
  return found


def _discard(path: str, folder: str) -> None:
  """Deletes a sibling folder of ``path``, renaming it to a ``del`` sibling first: a kill during
  the deletion must not leave something that looks like a complete copy."""
  if not os.path.basename(folder).startswith(f".{os.path.basename(path)}.del-"):
    doomed = _sibling(path, "del")
    os.rename(folder, doomed)
    folder = doomed
  shutil.rmtree(folder)


@contextlib.contextmanager
def reading(path: StrPath) -> Iterator[None]:
  """A shared lock on ``path`` for a load: no save swaps the folder while it is read. Without
  write access beside ``path`` (a read-only copy) there is no lock, and no save either."""
  try:
    with _locked(os.path.abspath(os.fspath(path)), shared=True):
      yield
  except _NoLock:
    yield


class _NoLock(Exception):
  """The lock file cannot be created (a read-only folder)."""


@contextlib.contextmanager
def _locked(path: str, shared: bool = False):
  """``flock`` on ``.<name>.lock`` beside ``path``: exclusive for a save (which deletes the file
  on release), shared for a load."""
  parent, name = os.path.split(path)
  lock_path = os.path.join(parent, f".{name}.lock")
  while True:
    try:
      fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except (PermissionError, OSError) as err:
      if shared and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOENT):
        raise _NoLock() from None
      raise
    try:
      fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
      current = os.path.samestat(os.fstat(fd), os.stat(lock_path))
    except FileNotFoundError:
      current = False
    except BaseException:
      os.close(fd)
      raise
    if current:
      break
    os.close(fd)  # the holder before us deleted the file we locked: lock the one there now
  try:
    yield
  finally:
    # The last holder deletes the file while still holding it, so a process waiting on it sees it
    # gone and locks afresh (a load deletes it only when no one else holds or waits for it).
    last = not shared
    if shared:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        last = True
      except BlockingIOError:
        pass
    if last:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path)
    os.close(fd)


def _fsync_tree(root: str) -> None:
  for folder, _, names in os.walk(root, topdown=False):
    for name in names:
      _fsync(os.path.join(folder, name))
    _fsync(folder, directory=True)


def _fsync(path: str, directory: bool = False) -> None:
  fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
  try:
    os.fsync(fd)
  except OSError as err:
    # Some file systems cannot sync a folder; the files in it are synced all the same.
    if not (directory and err.errno in (errno.EINVAL, errno.ENOTSUP)):
      raise
  finally:
    os.close(fd)
