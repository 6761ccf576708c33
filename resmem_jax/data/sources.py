"""Where examples come from: the embedded scikit-learn ``digits`` and TensorFlow Datasets.

TFDS is imported lazily, so the ``digits`` path never loads TensorFlow. Preparing a TFDS data set
honours ``data_dir`` (where the prepared files live) and ``manual_dir`` (where TFDS looks for the
original archives before downloading). When the archives are neither there nor reachable we raise
at once with instructions instead of letting the downloader retry for minutes.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import socket
import urllib.parse
from typing import Any

import numpy as np

from resmem_jax.data import augment
from resmem_jax.data import splits

# Seconds to wait for a TCP connection to a download host before declaring it unreachable.
REACHABILITY_TIMEOUT_S = 3.0
# Size of the fixed held-out test split of the embedded digits (about 20 % of 1797).
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  num_classes: int
  input_shape: tuple[int, int, int]
  scale: float  # raw pixel value that maps to 1.0
  flip: bool  # horizontal mirroring is label preserving
  in_memory: bool  # small enough to hold as NumPy arrays


SOURCES = {
    "digits": SourceSpec(10, (8, 8, 1), 16.0, False, True),
    "mnist": SourceSpec(10, (28, 28, 1), 255.0, False, True),
    "fashion_mnist": SourceSpec(10, (28, 28, 1), 255.0, False, True),
    "cifar10": SourceSpec(10, (32, 32, 3), 255.0, True, True),
    "cifar100": SourceSpec(100, (32, 32, 3), 255.0, True, True),
    "imagenet2012": SourceSpec(1000, (224, 224, 3), 255.0, True, False),
}
# TFDS's name for our held-out test split (ImageNet publishes labels for "validation" only).
TFDS_TEST_SPLIT = {"imagenet2012": "validation"}


def spec(name: str) -> SourceSpec:
  if name not in SOURCES:
    raise ValueError(f"data.name={name!r} is not a known data set; known: {sorted(SOURCES)}")
  return SOURCES[name]


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """A whole data set in memory: uint8 images and int32 labels per TFDS split."""
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  mean: np.ndarray  # per-channel statistics of train_images / scale
  std: np.ndarray


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits
  bunch = load_digits()
  images = bunch.images.astype(np.uint8)[..., None]  # values 0..16
  labels = bunch.target.astype(np.int32)
  order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
  test, train = np.sort(order[:DIGITS_TEST_SIZE]), np.sort(order[DIGITS_TEST_SIZE:])
  return images[train], labels[train], images[test], labels[test]


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
  return (f"Put {listed} in data.manual_dir (now {manual_dir}) - e.g. "
          f"--config.data.manual_dir=../shared/datasets/{name} where such a folder exists - or run "
          "on a machine that can reach the download servers. data.data_dir (default "
          "~/tensorflow_datasets) receives the prepared files.")


def _keep_tensorflow_off_accelerators() -> None:
  """tf.data only reads and decodes here; without this, a GPU build of TensorFlow would reserve
  accelerator memory that JAX needs."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):  # already initialised, or no such device type
    pass


def tfds_builder(name: str, data_dir: str | None, manual_dir: str | None):
  """A prepared TFDS builder; raises quickly (FileNotFoundError) when its data cannot be had."""
  _keep_tensorflow_off_accelerators()
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir)
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
    raise FileNotFoundError(
        f"TFDS data set {name!r} must be downloaded by hand and data.manual_dir={manual!r} is "
        f"empty or missing. {_help(name, manual, sorted(needed.values()))}\n"
        f"TFDS instructions:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  if missing:
    hosts = {(u.hostname, u.port or (443 if u.scheme == "https" else 80))
             for u in map(urllib.parse.urlparse, missing)}
    unreachable = sorted(h for h, p in hosts if h and not _host_reachable(h, p))
    if unreachable:
      raise FileNotFoundError(
          f"TFDS data set {name!r} is not prepared in data.data_dir={data_dir!r}, its archives "
          f"{sorted(missing.values())} are not in data.manual_dir={manual!r}, and the download "
          f"host(s) {unreachable} cannot be reached. "
          f"{_help(name, manual, sorted(needed.values()))}")
  config = tfds.download.DownloadConfig(
      manual_dir=manual,
      # With every archive local there is nothing to fetch; skip the GCS probe that hangs offline.
      # Builders that declare no URLs (e.g. c4) keep TFDS's default.
      try_download_gcs=bool(missing) or not needed)
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as err:  # TFDS raises many types; all mean the same thing to the user.
    raise RuntimeError(f"preparing TFDS data set {name!r} failed: {err}\n"
                       f"{_help(name, manual, sorted(needed.values()))}") from err
  return builder


def _tfds_arrays(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole split into memory by iterating (``batch_size=-1`` aborts under mock_data)."""
  import tensorflow_datasets as tfds
  dataset = builder.as_dataset(split=split, as_supervised=True).batch(4096)
  images, labels = [], []
  for image, label in tfds.as_numpy(dataset):
    images.append(np.asarray(image, dtype=np.uint8))
    labels.append(np.asarray(label, dtype=np.int32))
  if not images:
    raise ValueError(f"TFDS split {split!r} of {builder.name!r} is empty")
  return np.concatenate(images), np.concatenate(labels)


@functools.lru_cache(maxsize=4)
def array_source(name: str, data_dir: str | None, manual_dir: str | None) -> ArraySource:
  """The in-memory data set ``name`` (cached: later calls with the same arguments are free)."""
  source_spec = spec(name)
  if not source_spec.in_memory:
    raise ValueError(f"data set {name!r} is streamed, not held in memory")
  if name == "digits":
    train_x, train_y, test_x, test_y = _load_digits()
  else:
    builder = tfds_builder(name, data_dir, manual_dir)
    train_x, train_y = _tfds_arrays(builder, "train")
    test_x, test_y = _tfds_arrays(builder, TFDS_TEST_SPLIT.get(name, "test"))
  expected = source_spec.input_shape
  if train_x.shape[1:] != expected:
    raise ValueError(f"{name!r} images have shape {train_x.shape[1:]}, expected {expected}")
  mean, std = augment.channel_stats(train_x, source_spec.scale)
  for array in (train_x, train_y, test_x, test_y):
    array.setflags(write=False)
  return ArraySource(train_x, train_y, test_x, test_y, mean, std)


@dataclasses.dataclass(frozen=True)
class SplitView:
  """One of our splits of an in-memory data set: rows ``indices`` of ``images`` / ``labels``."""
  images: np.ndarray
  labels: np.ndarray
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)


@functools.lru_cache(maxsize=16)
def split_views(name: str, data_dir: str | None, manual_dir: str | None, val_fraction: float,
                train_fraction: float, split_seed: int) -> dict[str, SplitView]:
  """"train" / "validation" (carved from TFDS train) and "test" views of an in-memory source."""
  source = array_source(name, data_dir, manual_dir)
  train, validation = splits.carve_validation(len(source.train_labels), val_fraction, split_seed)
  train = splits.subsample(train, train_fraction, split_seed)
  return {
      "train": SplitView(source.train_images, source.train_labels, train),
      "validation": SplitView(source.train_images, source.train_labels, validation),
      "test": SplitView(source.test_images, source.test_labels,
                        np.arange(len(source.test_labels))),
  }


def clear_caches() -> None:
  """Forgets loaded arrays (e.g. between tests that mock TFDS differently)."""
  array_source.cache_clear()
  split_views.cache_clear()
  splits.epoch_permutation.cache_clear()


def config_value(data_cfg: Any, field: str, default: Any) -> Any:
  """``data_cfg.field`` of a ConfigDict, dataclass or dict; ``default`` when absent or None."""
  if isinstance(data_cfg, dict):
    value = data_cfg.get(field, default)
  else:
    value = getattr(data_cfg, field, default)
  return default if value is None else value
