"""The ResMem memory: embeddings of training examples with their residuals beside them.

    mem = build_memory(train_embeddings, residuals, backend="exact")   # or "scann"
    dist, idx = mem.search(test_embeddings, k=8)      # Euclidean, ascending
    pred = mem.predict(base_probs, test_embeddings, k=8, sigma=0.5)
    mem.add(new_embeddings, new_residuals)           # queryable at once
    mem.save("/tmp/mem"); mem = load_memory("/tmp/mem")

Backends: ``exact`` (blocked brute force in JAX, keys sharded over the local devices; the recall
reference) and ``scann`` (ScaNN, see :mod:`resmem_jax.memory.scann_index`). Residual formats:
see :mod:`resmem_jax.memory.storage`.

Memory editing with ``scann``: new keys go to a side buffer that is searched exactly and merged
with the ScaNN results at query time, so they are neighbours at once and never missed; the ScaNN
index is rebuilt over everything only when the buffer outgrows a tenth of the indexed keys
(a rebuild of 1M keys costs about a minute, searching a small buffer exactly costs little).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax import resmem as resmem_math
from resmem_jax.memory import storage
from resmem_jax.memory.exact import RERANK_MARGIN, ExactIndex, rerank_exact

BACKENDS = ("exact", "scann")
EXACT_OPTIONS = ("block_size", "query_chunk", "devices")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# Queries per residual gather: bounds the [chunk, k, C] dense neighbour residuals in RAM.
ESTIMATE_CHUNK = 4096

__all__ = ["Memory", "build_memory", "load_memory", "BACKENDS"]


def _float_matrix(value, name: str, allow_empty: bool = False, copy: bool = True) -> np.ndarray:
  array = np.asarray(value)
  if not (np.issubdtype(array.dtype, np.floating) or array.dtype == jnp.bfloat16):
    raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
  if array.ndim != 2:
    raise ValueError(f"{name} must be 2-D [n, dim], got shape {array.shape}")
  if array.shape[0] == 0 and not allow_empty:
    raise ValueError(f"{name} is empty (0 rows); a memory needs at least one example")
  # Stored arrays are copied (a caller may mutate theirs later); queries need not be.
  array = array.astype(np.float32, copy=copy)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} contains NaN or inf")
  return array


def _json_metadata(metadata) -> dict:
  if metadata is None:
    return {}
  if hasattr(metadata, "to_dict"):  # ml_collections.ConfigDict
    metadata = metadata.to_dict()
  if not isinstance(metadata, dict):
    raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
  try:
    return json.loads(json.dumps(metadata, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))
  except (TypeError, ValueError) as err:
    raise ValueError(f"metadata must be JSON-serialisable: {err}") from None


@jax.jit
def _weights_and_estimate(distances, sigma, neighbour_residuals):
  weights = resmem_math.neighbour_weights(distances, sigma)
  return resmem_math.residual_estimate(weights, neighbour_residuals)


_weights = jax.jit(resmem_math.neighbour_weights)


class Memory:
  """Keys ``[n, d]`` float32 + residuals ``[n, C]`` + a nearest-neighbour index. Build with
  :func:`build_memory` or :func:`load_memory`."""

  def __init__(self, keys, store, backend, backend_options, metadata, scann_index=None):
    self._keys = keys
    self._store = store
    self.backend = backend
    self.backend_options = dict(backend_options)
    self.metadata = metadata
    self._exact = None
    self._scann = scann_index
    self._buffer = None  # exact index over keys added since the last ScaNN build
    if backend == "exact":
      self._exact = ExactIndex(keys, **self.backend_options)
    elif scann_index is None:
      self._build_scann()
    elif scann_index.size < len(keys):
      self._buffer = ExactIndex(keys[scann_index.size:])

  # -- properties -----------------------------------------------------------------------------
  @property
  def size(self) -> int:
    return self._keys.shape[0]

  @property
  def dim(self) -> int:
    return self._keys.shape[1]

  @property
  def num_outputs(self) -> int:
    return self._store.num_outputs

  @property
  def residual_format(self) -> str:
    return self._store.format

  @property
  def keys(self) -> np.ndarray:
    return self._keys

  def bytes_per_example(self) -> dict:
    """Stored bytes per example: ``{"keys": ..., "residuals": ...}``."""
    return {"keys": float(self._keys.itemsize * self.dim),
            "residuals": self._store.bytes_per_example()}

  def __repr__(self):
    return (f"Memory(size={self.size}, dim={self.dim}, num_outputs={self.num_outputs}, "
            f"backend={self.backend!r}, residual_format={self.residual_format!r})")

  # -- search ---------------------------------------------------------------------------------
  def _build_scann(self):
    from resmem_jax.memory.scann_index import ScannIndex  # pylint: disable=g-import-not-at-top
    self._scann = ScannIndex(self._keys, self.backend_options)
    self._buffer = None

  def _check_queries(self, queries) -> np.ndarray:
    queries = _float_matrix(queries, "queries", allow_empty=True, copy=False)
    if queries.shape[1] != self.dim:
      raise ValueError(f"queries have dimension {queries.shape[1]} but the memory keys have {self.dim}")
    return queries

  def _check_k(self, k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
      raise ValueError(f"k must be an integer, got {k!r}")
    if k < 1 or k > self.size:
      raise ValueError(f"k must be in [1, {self.size}] (the memory size), got {k}")
    return int(k)

  def search(self, queries, k: int):
    """k nearest keys by Euclidean distance.

    Returns ``(distances [q, k] float32, NOT squared, ascending; indices [q, k] int32)``.
    ``exact`` is exact; ``scann`` is approximate in which ids it returns but its distances are
    exactly those of the returned ids.
    """
    queries = self._check_queries(queries)
    k = self._check_k(k)
    if self.backend == "exact":
      return self._exact.search(queries, k)
    ids = self._scann.candidate_ids(queries, min(k, self._scann.size))
    if self._buffer is not None:
      # Spare candidates because the buffer's expansion ranking is not exact (see exact.py).
      extra = self._buffer.candidates(queries, k + RERANK_MARGIN)
      ids = np.concatenate([ids, extra + self._scann.size], axis=1)
    return rerank_exact(queries, self._keys, ids, k)

  def tune_search(self, queries, k: int, target_recall: float = 0.99, **grids) -> dict:
    """Fastest ScaNN query settings reaching ``target_recall`` (recall@k vs exact) on ``queries``.

    See :func:`resmem_jax.memory.tuning.tune_search`; the settings stay with this memory.
    """
    from resmem_jax.memory import tuning  # pylint: disable=g-import-not-at-top
    return tuning.tune_search(self, queries, k, target_recall, **grids)

  # -- residuals and predictions --------------------------------------------------------------
  def gather_residuals(self, indices) -> np.ndarray:
    """Dense float32 residuals ``[..., C]`` of memory rows ``indices``."""
    indices = np.asarray(indices)
    if not np.issubdtype(indices.dtype, np.integer):
      raise ValueError(f"indices must be integers, got dtype {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= self.size):
      raise ValueError(f"indices must lie in [0, {self.size}), got range [{indices.min()}, {indices.max()}]")
    return self._store.gather(indices)

  def residual_estimate(self, queries, k: int, sigma) -> np.ndarray:
    """``sum_i softmax(-d_i / sigma) r_i`` over the k nearest keys: float32 ``[q, C]``."""
    resmem_math.check_sigma(sigma)
    distances, indices = self.search(queries, k)
    sigma = np.float32(sigma)
    out = np.empty((distances.shape[0], self.num_outputs), np.float32)
    for start in range(0, distances.shape[0], ESTIMATE_CHUNK):
      stop = start + ESTIMATE_CHUNK
      if self.residual_format == "sparse":
        weights = np.asarray(_weights(distances[start:stop], sigma))
        out[start:stop] = self._store.weighted_sum(weights, indices[start:stop])
      else:
        out[start:stop] = np.asarray(_weights_and_estimate(
            distances[start:stop], sigma, self._store.gather(indices[start:stop])))
    return out

  def predict(self, base, queries, k: int, sigma) -> np.ndarray:
    """ResMem prediction ``base + residual_estimate(queries, k, sigma)``, float32 ``[q, C]``."""
    base = _float_matrix(base, "base", allow_empty=True)
    if base.shape[1] != self.num_outputs:
      raise ValueError(f"base has {base.shape[1]} outputs but the memory residuals have {self.num_outputs}")
    if base.shape[0] != np.shape(queries)[0]:
      raise ValueError(f"base has {base.shape[0]} rows but queries has {np.shape(queries)[0]}")
    return base + self.residual_estimate(queries, k, sigma)

  # -- editing --------------------------------------------------------------------------------
  def add(self, keys, residuals) -> None:
    """Appends examples (memory editing); they are returned by the next search."""
    keys = _float_matrix(keys, "keys")
    residuals = _float_matrix(residuals, "residuals")
    if keys.shape[1] != self.dim:
      raise ValueError(f"keys have dimension {keys.shape[1]} but the memory keys have {self.dim}")
    if residuals.shape[1] != self.num_outputs:
      raise ValueError(f"residuals have {residuals.shape[1]} outputs but the memory has {self.num_outputs}")
    if keys.shape[0] != residuals.shape[0]:
      raise ValueError(f"keys has {keys.shape[0]} rows but residuals has {residuals.shape[0]}")
    self._keys = np.concatenate([self._keys, keys])
    self._store.append(residuals)
    if self.backend == "exact":
      self._exact.add(self._keys)
    elif self.size - self._scann.size > max(1024, self._scann.size // 10):
      self._build_scann()
    else:
      self._buffer = ExactIndex(self._keys[self._scann.size:])

  def with_residuals(self, residuals, metadata=None) -> "Memory":
    """A memory over the same keys and search index with new residual values.

    For residuals recomputed at another temperature: the index (a ScaNN build can take minutes)
    is shared, not rebuilt. ``residuals`` is an ``[n, C]`` array or an iterable of row chunks in
    order (so a large-vocabulary sparse memory never holds all dense rows at once). The format
    (and ``top_m``) stay those of this memory; ``metadata`` defaults to this memory's.
    """
    chunks = [residuals] if isinstance(residuals, np.ndarray) or hasattr(residuals, "shape") else residuals
    store = None
    for chunk in chunks:
      chunk = _float_matrix(chunk, "residuals")
      if chunk.shape[1] != self.num_outputs:
        raise ValueError(f"residuals have {chunk.shape[1]} outputs but the memory has {self.num_outputs}")
      if store is None:
        store = storage.make_store(chunk, self.residual_format, getattr(self._store, "top_m", None))
      else:
        store.append(chunk)
    if store is None or len(store) != self.size:
      got = 0 if store is None else len(store)
      raise ValueError(f"residuals have {got} rows but the memory has {self.size} keys")
    clone = Memory.__new__(Memory)
    clone.__dict__.update(self.__dict__)
    clone._store = store
    # The ScaNN searcher is shared (Memory.add rebinds, never mutates it); the exact index is
    # cheap to recreate and is mutated by add, so the clone gets its own.
    if self.backend == "exact":
      clone._exact = ExactIndex(self._keys, **self.backend_options)
    clone.metadata = self.metadata if metadata is None else _json_metadata(metadata)
    return clone

  # -- persistence ----------------------------------------------------------------------------
  def save(self, path) -> None:
    """Writes the memory to directory ``path`` atomically (temp dir + rename)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
      arrays = {"keys": self._keys, **self._store.arrays()}
      for name, array in arrays.items():
        np.save(os.path.join(tmp, f"{name}.npy"), array, allow_pickle=False)
      manifest = {
          "format_version": MANIFEST_VERSION,
          "n": self.size, "d": self.dim, "num_outputs": self.num_outputs,
          "key_dtype": "float32",
          "residual_format": self.residual_format,
          "residual_dtypes": {name: str(a.dtype) for name, a in arrays.items() if name != "keys"},
          "top_m": getattr(self._store, "top_m", None),
          "backend": self.backend,
          "backend_options": {k: v for k, v in self.backend_options.items() if k != "devices"},
          "metadata": self.metadata,
      }
      if self.backend == "scann":
        self._scann.serialize(os.path.join(tmp, "scann"))
        manifest["scann"] = {"indexed": self._scann.size, "options": self._scann.options,
                             "center": self._scann.center.tolist()}
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


def build_memory(keys, residuals, backend: str = "exact", residual_format: str = "dense",
                 top_m: int | None = None, metadata=None, **backend_options) -> Memory:
  """Builds a ResMem memory.

  Args:
    keys: embeddings ``[n, d]`` (floating point, finite).
    residuals: residuals ``[n, C]`` (see :func:`resmem_jax.residuals`).
    backend: ``"exact"`` or ``"scann"``.
    residual_format: ``"dense"`` (float32), ``"bfloat16"`` or ``"sparse"`` (true label + ``top_m``
      largest probabilities; see :mod:`resmem_jax.memory.storage` for its error bound).
    top_m: entries kept by ``"sparse"`` besides the label (default 16); ignored otherwise.
    metadata: JSON-serialisable dict (e.g. the producing model's config and step), saved in the
      manifest.
    **backend_options: ``exact``: block_size, query_chunk, devices; ``scann``: see
      :data:`resmem_jax.memory.scann_index.OPTION_NAMES`.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
  if residual_format not in storage.FORMATS:
    raise ValueError(f"residual_format must be one of {list(storage.FORMATS)}, got {residual_format!r}")
  keys = _float_matrix(keys, "keys")
  residuals = _float_matrix(residuals, "residuals")
  if keys.shape[0] != residuals.shape[0]:
    raise ValueError(f"keys has {keys.shape[0]} rows but residuals has {residuals.shape[0]}")
  if residual_format == "sparse":
    top_m = 16 if top_m is None else top_m
    if isinstance(top_m, bool) or not isinstance(top_m, (int, np.integer)) or top_m < 1:
      raise ValueError(f"top_m must be a positive integer, got {top_m!r}")
  if backend == "exact":
    unknown = sorted(set(backend_options) - set(EXACT_OPTIONS))
    if unknown:
      raise ValueError(f"unknown exact backend options {unknown}; valid: {list(EXACT_OPTIONS)}")
  store = storage.make_store(residuals, residual_format, top_m)
  return Memory(keys, store, backend, backend_options, _json_metadata(metadata))


def load_memory(path) -> Memory:
  """Loads a memory written by :meth:`Memory.save`, verifying sizes and checksums."""
  path = os.fspath(path)
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no memory directory at {path}")
  if not os.path.isfile(manifest_path):
    raise FileNotFoundError(f"{manifest_path} is missing; {path} is not a saved memory")
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
    n, d, num_outputs = int(manifest["n"]), int(manifest["d"]), int(manifest["num_outputs"])
    backend, residual_format = manifest["backend"], manifest["residual_format"]
    files = manifest["files"]
  except (ValueError, KeyError, TypeError) as err:
    raise ValueError(f"{manifest_path} is corrupt or incomplete: {err!r}") from None
  if manifest.get("format_version") != MANIFEST_VERSION:
    raise ValueError(f"{manifest_path} has format_version {manifest.get('format_version')}, "
                     f"this code reads {MANIFEST_VERSION}")
  if backend not in BACKENDS or residual_format not in storage.FORMATS:
    raise ValueError(f"{manifest_path} names backend {backend!r} / residual_format "
                     f"{residual_format!r}, expected one of {BACKENDS} / {storage.FORMATS}")
  for rel, info in files.items():
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
      raise ValueError(f"memory file {full} listed in the manifest is missing")
    size = os.path.getsize(full)
    if size != info["bytes"]:
      raise ValueError(f"memory file {full} has {size} bytes, the manifest says {info['bytes']} "
                       "(truncated or replaced)")
    if _sha256(full) != info["sha256"]:
      raise ValueError(f"memory file {full} fails its sha256 checksum (corrupt)")

  def load(name):
    try:
      return np.load(os.path.join(path, f"{name}.npy"), allow_pickle=False)
    except (OSError, ValueError) as err:
      raise ValueError(f"cannot read {name}.npy in {path}: {err}") from None

  keys = load("keys")
  if keys.dtype != np.float32 or keys.shape != (n, d):
    raise ValueError(f"keys.npy has shape {keys.shape} dtype {keys.dtype}, the manifest says "
                     f"({n}, {d}) float32")
  names = ["sparse_columns", "sparse_values"] if residual_format == "sparse" else ["residuals"]
  store = storage.store_from_arrays({name: load(name) for name in names}, residual_format,
                                    num_outputs, manifest.get("top_m"))
  if len(store) != n:
    raise ValueError(f"residual files hold {len(store)} rows, the manifest says n={n}")
  options = manifest.get("backend_options", {})
  scann_index = None
  if backend == "scann":
    from resmem_jax.memory.scann_index import ScannIndex  # pylint: disable=g-import-not-at-top
    info = manifest["scann"]
    indexed = int(info["indexed"])
    if not 0 < indexed <= n:
      raise ValueError(f"{manifest_path}: scann indexed count {indexed} is not in [1, {n}]")
    scann_index = ScannIndex.load(os.path.join(path, "scann"), keys[:indexed], info["options"],
                                  np.asarray(info["center"], np.float32))
  return Memory(keys, store, backend, options, manifest.get("metadata", {}), scann_index=scann_index)
