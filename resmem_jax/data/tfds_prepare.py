"""Preparing TensorFlow Datasets (TFDS) data sets: local archives first, a fast error offline.

Used by every TFDS-backed data set (images held in memory, ImageNet, text). Preparing honours
``data_dir`` (where the prepared files live) and ``manual_dir`` (where TFDS looks for the original
archives before downloading). When the archives are neither there nor reachable we raise at once
with instructions instead of letting the downloader retry for minutes. TFDS is imported lazily,
so data sets that do not use it never load TensorFlow.
"""
from __future__ import annotations

import os
import socket
import urllib.parse

from resmem_jax import quiet

# Seconds to wait for a TCP connection to a download host before declaring it unreachable.
REACHABILITY_TIMEOUT_S = 3.0


class DataUnavailable(FileNotFoundError):
  """A data set's files are neither prepared in ``data.data_dir``, nor in ``data.manual_dir``, nor
  to be had from the download servers. The message's first line names the files and the flag that
  points at them (the command-line tools print just that line; ``--verbose`` the rest too)."""


def _tfds_mocked() -> bool:
  """True inside ``tfds.testing.mock_data``, where preparing is a no-op and needs no files."""
  import tensorflow_datasets as tfds
  prepare = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(prepare, "__name__", "") == "mock_download_and_prepare"


def _host_reachable(host: str, port: int) -> bool:
  try:
    with socket.create_connection((host, port), timeout=REACHABILITY_TIMEOUT_S):
      return True
  except OSError:
    return False


def _help(name: str, manual_dir: str, files: list[str]) -> str:
  listed = ", ".join(files) if files else "the archives TFDS documents for it"
  return (f"Put {listed} in a folder and pass it as --config.data.manual_dir=/path/to/folder "
          f"(now {manual_dir}), or run on a machine that can reach the download servers. "
          "data.data_dir (default ~/tensorflow_datasets) receives the prepared files.")


def _keep_tensorflow_off_accelerators() -> None:
  """tf.data only reads and decodes here; without this, a GPU build of TensorFlow would reserve
  accelerator memory that JAX needs."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    from resmem_jax import settings  # pylint: disable=g-import-not-at-top
    raise settings.MissingDependency(
        f"TFDS data sets need TensorFlow to be read and prepared ({err}): pip install "
        "'resmem_jax[tfds]' (the embedded digits need no TensorFlow)") from None
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):  # already initialised, or no such device type
    pass


def unprepared_builder(name: str, data_dir: str | None):
  """The TFDS builder object of ``name``: its features and metadata, no data read or written."""
  _keep_tensorflow_off_accelerators()
  import tensorflow_datasets as tfds
  return tfds.builder(name, data_dir=data_dir)


def prepare(builder, manual_dir: str | None):
  """``builder`` prepared; raises quickly (DataUnavailable) when its data cannot be had."""
  import tensorflow_datasets as tfds
  name = builder.name
  if builder.is_prepared() or _tfds_mocked():
    return builder
  # TFDS's own default when no manual_dir is configured.
  manual = os.path.expanduser(manual_dir) if manual_dir else os.fspath(
      builder.data_dir_root / "downloads" / "manual")
  present = set(os.listdir(manual)) if os.path.isdir(manual) else set()
  url_infos = getattr(builder, "url_infos", None) or {}
  needed = {url: (info.filename or os.path.basename(urllib.parse.urlparse(url).path))
            for url, info in url_infos.items()}
  missing = {url: f for url, f in needed.items() if f not in present}
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) and not present:
    raise DataUnavailable(
        f"TFDS data set {name!r} must be downloaded by hand and data.manual_dir={manual!r} is "
        f"empty or missing. {_help(name, manual, sorted(needed.values()))} (--verbose adds "
        "TFDS's download instructions)\n"
        f"TFDS instructions:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  if missing:
    hosts = {(u.hostname, u.port or (443 if u.scheme == "https" else 80))
             for u in map(urllib.parse.urlparse, missing)}
    unreachable = sorted(h for h, p in hosts if h and not _host_reachable(h, p))
    if unreachable:
      raise DataUnavailable(
          f"TFDS data set {name!r} is not prepared in data.data_dir={str(builder.data_dir_root)!r}"
          f", its archives {sorted(missing.values())} are not in data.manual_dir={manual!r}, and "
          f"the download host(s) {unreachable} cannot be reached. "
          f"{_help(name, manual, sorted(needed.values()))}")
  config = tfds.download.DownloadConfig(
      manual_dir=manual,
      # With every archive local there is nothing to fetch; skip the GCS probe that hangs offline.
      # Builders that declare no URLs (e.g. c4) keep TFDS's default.
      try_download_gcs=bool(missing) or not needed)
  try:
    with quiet.hidden_output():  # TFDS prints its own progress while it prepares
      builder.download_and_prepare(download_config=config)
  except OSError as err:
    if err.errno is not None:  # the OS refused (disk full, permissions): said as such by the tools
      raise
    raise _unavailable(name, manual, needed, err) from err
  except Exception as err:  # TFDS raises many types; all mean the same thing to the user.
    raise _unavailable(name, manual, needed, err) from err
  return builder


def _unavailable(name: str, manual: str, needed: dict[str, str], err: Exception):
  """Preparing failed (a download refused, a proxy, a broken archive): one line first."""
  lines = str(err).strip().splitlines()
  cause = (lines[0] if lines else type(err).__name__)[:300]
  return DataUnavailable(f"preparing TFDS data set {name!r} failed ({cause}). "
                         f"{_help(name, manual, sorted(needed.values()))}\n{err}")


def tfds_builder(name: str, data_dir: str | None, manual_dir: str | None):
  """A prepared TFDS builder; raises quickly (DataUnavailable) when its data cannot be had."""
  return prepare(unprepared_builder(name, data_dir), manual_dir)
