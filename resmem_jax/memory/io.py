"""Saving and loading a memory: the directory layout, its manifest, checksums, atomic writes.

A saved memory is a directory::

    manifest.json         what is there (format_version, n, d, num_outputs, dtypes, residual
                          format, top_m, backend, backend options, index info, metadata) and the
                          byte count + sha256 of every other file
    keys.npy              float32 [n, d]
    labels.npy            int32 [n] (only when the memory has labels)
    residuals.npy         dense: float32 [n, C]; bfloat16: its uint16 bit pattern
    sparse_columns.npy    sparse: class ids [n, m + 1]
    sparse_values.npy     sparse: float32 [n, m + 1]
    index/                the backend's own files (:meth:`SearchIndex.save`; may be empty)

It is written into a temporary sibling directory and renamed into place, so ``path`` holds either
the old memory or the complete new one. Loading verifies every listed file's size and checksum
before reading it, then every shape against the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from resmem_jax.memory import index as index_lib
from resmem_jax.memory import store as store_lib

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: index/ directory, index info, labels
INDEX_DIR = "index"


def save(path, keys: np.ndarray, labels: np.ndarray | None, store, backend: str, index,
         metadata: dict) -> None:
  """Writes a memory's parts to directory ``path`` atomically (temp dir + rename)."""
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    arrays = {"keys": keys, **store.arrays()}
    if labels is not None:
      arrays["labels"] = labels
    for name, array in arrays.items():
      np.save(os.path.join(tmp, f"{name}.npy"), array, allow_pickle=False)
    os.makedirs(os.path.join(tmp, INDEX_DIR))
    index_info = index.save(os.path.join(tmp, INDEX_DIR))
    manifest = {
        "format_version": MANIFEST_VERSION,
        "n": int(keys.shape[0]), "d": int(keys.shape[1]), "num_outputs": int(store.num_outputs),
        "key_dtype": "float32",
        "residual_format": store.format,
        "residual_dtypes": {name: str(a.dtype) for name, a in store.arrays().items()},
        "top_m": getattr(store, "top_m", None),
        "labels": labels is not None,
        "backend": backend,
        "backend_options": index.options,
        "index": index_info,
        "metadata": metadata,
    }
    manifest["files"] = _file_digests(tmp)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    # Swap in: an existing memory at `path` is replaced only once the new one is complete.
    backup = None
    if os.path.exists(path):
      backup = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
      os.rename(path, os.path.join(backup, "memory"))
    os.rename(tmp, path)
    if backup:
      shutil.rmtree(backup, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _file_digests(root: str) -> dict:
  digests = {}
  for folder, _, names in os.walk(root):
    for name in sorted(names):
      full = os.path.join(folder, name)
      rel = os.path.relpath(full, root)
      if rel == MANIFEST:
        continue
      digests[rel] = {"bytes": os.path.getsize(full), "sha256": _sha256(full)}
  return digests


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def load(path):
  """``(keys, labels | None, store, backend, index, metadata)`` of the memory saved at ``path``.

  Raises FileNotFoundError when ``path`` is not a saved memory and ValueError when it is damaged
  (truncated, corrupt, or disagreeing with its manifest).
  """
  path = os.fspath(path)
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no memory directory at {path}")
  if not os.path.isfile(manifest_path):
    raise FileNotFoundError(f"{manifest_path} is missing; {path} is not a saved memory")
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
    version = manifest.get("format_version")
    n, d, num_outputs = int(manifest["n"]), int(manifest["d"]), int(manifest["num_outputs"])
    backend, residual_format = manifest["backend"], manifest["residual_format"]
    files, index_info = manifest["files"], manifest["index"]
    has_labels = bool(manifest["labels"])
    sizes = {rel: int(info["bytes"]) for rel, info in files.items()}
    digests = {rel: str(info["sha256"]) for rel, info in files.items()}
  except (ValueError, KeyError, TypeError, AttributeError) as err:
    raise ValueError(f"{manifest_path} is corrupt or incomplete: {err!r}") from None
  if version != MANIFEST_VERSION:
    raise ValueError(f"{manifest_path} has format_version {version}, this code reads "
                     f"{MANIFEST_VERSION}; rebuild the memory")
  if backend not in index_lib.BACKENDS or residual_format not in store_lib.FORMATS:
    raise ValueError(f"{manifest_path} names backend {backend!r} / residual_format "
                     f"{residual_format!r}, expected one of {tuple(index_lib.BACKENDS)} / "
                     f"{store_lib.FORMATS}")
  for rel in files:
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
      raise ValueError(f"memory file {full} listed in the manifest is missing")
    size = os.path.getsize(full)
    if size != sizes[rel]:
      raise ValueError(f"memory file {full} has {size} bytes, the manifest says {sizes[rel]} "
                       "(truncated or replaced)")
    if _sha256(full) != digests[rel]:
      raise ValueError(f"memory file {full} fails its sha256 checksum (corrupt)")

  def read(name):
    if f"{name}.npy" not in files:
      raise ValueError(f"{manifest_path} does not list {name}.npy")
    try:
      return np.load(os.path.join(path, f"{name}.npy"), allow_pickle=False)
    except (OSError, ValueError) as err:
      raise ValueError(f"cannot read {name}.npy in {path}: {err}") from None

  keys = read("keys")
  if keys.dtype != np.float32 or keys.shape != (n, d):
    raise ValueError(f"keys.npy has shape {keys.shape} dtype {keys.dtype}, the manifest says "
                     f"({n}, {d}) float32")
  labels = None
  if has_labels:
    labels = read("labels")
    if labels.dtype != np.int32 or labels.shape != (n,):
      raise ValueError(f"labels.npy has shape {labels.shape} dtype {labels.dtype}, the manifest "
                       f"says ({n},) int32")
  names = ["sparse_columns", "sparse_values"] if residual_format == "sparse" else ["residuals"]
  store = store_lib.store_from_arrays({name: read(name) for name in names}, residual_format,
                                      num_outputs, manifest.get("top_m"))
  if len(store) != n:
    raise ValueError(f"residual files hold {len(store)} rows, the manifest says n={n}")
  try:
    index = index_lib.index_class(backend).load(os.path.join(path, INDEX_DIR), keys, index_info)
  except KeyError as err:
    raise ValueError(f"{manifest_path}: the {backend} index info lacks {err}") from None
  except (TypeError, ValueError) as err:
    raise ValueError(f"{manifest_path}: cannot load the {backend} index: {err}") from None
  return keys, labels, store, backend, index, manifest.get("metadata", {})
