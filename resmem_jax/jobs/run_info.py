"""What made a ``results.json``: the ``"run"`` block that lets the file describe itself.

    started = run_info.now()
    ...
    results["run"] = run_info.describe(started, run_info.now())

The block holds the schema version, the installed versions of the packages a result depends on
(the same list as ``run.json``, :func:`provenance.versions`), where the code came from (the git
commit and whether the checkout had uncommitted changes, or the installed version when not run
from a checkout), when the run began and ended (UTC, ISO 8601), the devices and processes it ran
on and the command line that started it. Nothing here fails a run: what cannot be found is None.
"""
from __future__ import annotations

import datetime
import pathlib
import subprocess
import sys
from importlib import metadata
from typing import Any

import jax

# results.json's schema; raised when a key is removed or changes meaning (adding one keeps it).
SCHEMA_VERSION = 1
GIT_TIMEOUT_S = 5.0
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent


def now() -> datetime.datetime:
  """The current time in UTC (what :func:`describe` takes)."""
  return datetime.datetime.now(datetime.timezone.utc)


def iso(moment: datetime.datetime) -> str:
  """``2025-01-31T12:34:56.789012+00:00``: ISO 8601 in UTC."""
  return moment.astimezone(datetime.timezone.utc).isoformat()


def _git(*args: str) -> str | None:
  """``git -C PACKAGE_DIR ARGS``'s output, or None (no git, not a checkout, timeout, error)."""
  try:
    done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True,
                          timeout=GIT_TIMEOUT_S, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout if done.returncode == 0 else None


def source() -> dict[str, Any]:
  """``{"commit", "dirty", "installed_version"}``: the checkout's HEAD and whether its tracked
  files had uncommitted changes when the package runs from a git checkout (its folder tracked
  there), else ``commit`` and ``dirty`` None; the installed distribution's version, if any."""
  try:
    installed: str | None = metadata.version("resmem_jax")
  except metadata.PackageNotFoundError:
    installed = None
  commit = dirty = None
  # Tracked: the package is part of this checkout (not merely installed inside some other repo).
  if _git("ls-files", "--error-unmatch", "__init__.py") is not None:
    head = _git("rev-parse", "HEAD")
    if head is not None:
      commit = head.strip()
      status = _git("status", "--porcelain", "--untracked-files=no")
      dirty = None if status is None else bool(status.strip())
  return {"commit": commit, "dirty": dirty, "installed_version": installed}


def devices() -> dict[str, Any]:
  """The devices the run saw: ``platform``, ``device_kind``, ``count`` (all processes') and
  ``local_count`` (this process's)."""
  found = jax.devices()
  kinds = sorted({d.device_kind for d in found})
  return {"platform": found[0].platform if found else None,
          "device_kind": kinds[0] if len(kinds) == 1 else kinds,
          "count": len(found), "local_count": jax.local_device_count()}


def command_line(argv: list[str] | None = None) -> dict[str, Any]:
  """``{"argv", "config", "overrides"}``: the command line as given, the ``--config`` named there
  (a packaged config's name[:variant] or a file) and its ``--config.a.b=v`` overrides, in order
  (None and [] when the run was not started by a tool that takes --config)."""
  argv = list(sys.argv if argv is None else argv)
  config, overrides, take_next = None, [], False
  for arg in argv[1:]:
    if take_next:
      config, take_next = arg, False
    elif arg == "--config":
      take_next = True
    elif arg.startswith("--config="):
      config = arg[len("--config="):]
    elif arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
  return {"argv": argv, "config": config, "overrides": overrides}


def describe(started: datetime.datetime, ended: datetime.datetime) -> dict[str, Any]:
  """results.json's ``"run"`` block (see the module docstring)."""
  # Here, not above: importing the training package loads orbax (engine imports it late too).
  from resmem_jax.training import provenance  # pylint: disable=g-import-not-at-top
  return {
      "schema_version": SCHEMA_VERSION,
      "versions": provenance.versions(),
      "source": source(),
      "started": iso(started),
      "ended": iso(ended),
      "seconds": round((ended - started).total_seconds(), 3),
      "devices": devices(),
      "processes": {"process_count": jax.process_count(), "process_index": jax.process_index()},
      "command": command_line(),
  }
