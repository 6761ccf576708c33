"""The ResMem memory: embeddings of training examples with their residuals beside them.

    mem = build_memory(train_embeddings, residuals, backend="exact")   # or "scann"
    distances, ids = mem.search(test_embeddings, k=8)   # Euclidean, ascending, exact distances
    values, columns = mem.residual_rows(ids)            # the neighbours' stored residual rows
    mem.add(new_embeddings, new_residuals)              # queryable at once
    mem.save("/tmp/mem"); mem = load_memory("/tmp/mem")

A memory is keys (in a key format: ``float32``, ``bfloat16``, ``float16`` or ``int8``, see
``keys.py``) + a residual store + a search index (+ optionally the label each key memorizes, for
the kNN-LM head). It finds neighbours and returns their rows; the prediction
``p + sum_i w_i r_i`` is computed by :mod:`resmem_jax.core.predictor` (on whole query sets:
:mod:`resmem_jax.resmem`).

  index.py    the SearchIndex interface and the backend registry (adding a backend: one module
              plus one registry line)
  exact.py    ``exact``: blocked brute force in JAX, keys sharded over the local devices; the
              recall reference
  scann.py    ``scann``: ScaNN (AH codes only; the memory re-ranks), with an exact side buffer
              for keys added after the build
  keys.py     key formats ``float32``, ``bfloat16``, ``float16``, ``int8`` (with their error bounds)
  rerank_kernel.py  the exact re-rank's squared distances in one compiled pass (numba, optional)
  store.py    residual formats ``dense``, ``bfloat16``, ``sparse`` (with their error bounds)
  scaling.py  power-of-two scaling of keys and queries (no float32 overflow), the input limit
  io.py       the saved layout, manifest and checksums
  atomic_dir.py  replacing a folder so that a kill leaves the old or the new one
  tuning.py   query-time settings tuned to a recall target on real queries

Every backend's candidates are re-ranked once by directly computed distance from the stored
keys, so returned distances are exact for those keys (for ``float32``, the keys given); an
approximate backend is approximate only in which ids it returns.
"""
from __future__ import annotations

import copy
import json

import numpy as np

from resmem_jax.memory import checks
from resmem_jax.memory import index as index_lib
from resmem_jax.memory import io
from resmem_jax.memory import store as store_lib
from resmem_jax.memory.exact import rerank_exact
from resmem_jax.memory.keys import KEY_FORMATS
from resmem_jax.memory.keys import KeyStore

BACKENDS = tuple(index_lib.BACKENDS)
FORMATS = store_lib.FORMATS
# Rows of keys scored per step when a memory searches a query exhaustively.
EXHAUSTIVE_ROWS = 65_536
DEFAULT_TOP_M = 16

__all__ = ["Memory", "build_memory", "memory_from_store", "load_memory", "parse_backend_options",
           "check_options", "check_size", "has_query_settings", "BACKENDS", "FORMATS",
           "KEY_FORMATS"]


def _json_value(value):
  """ConfigDicts and NumPy / JAX scalars as JSON values; anything else is refused (not turned
  into its ``str``, which would not load back as what was saved)."""
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
    return value.to_dict()
  if hasattr(value, "item") and np.ndim(value) == 0:
    return value.item()
  raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


def _json_metadata(metadata) -> dict:
  if metadata is None:
    return {}
  if hasattr(metadata, "to_dict"):  # ml_collections.ConfigDict
    metadata = metadata.to_dict()
  if not isinstance(metadata, dict):
    raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
  try:
    return json.loads(json.dumps(metadata, default=_json_value))
  except (TypeError, ValueError, RecursionError) as err:  # RecursionError: nested too deeply
    raise ValueError(f"metadata must be JSON-serialisable: {err}") from None


class Memory:
  """Keys ``[n, d]`` (a :class:`~resmem_jax.memory.keys.KeyStore`) + a residual store + a search
  index (+ optional labels ``[n]`` int32). Build with :func:`build_memory`,
  :func:`memory_from_store` or :func:`load_memory`."""

  def __init__(self, keys: KeyStore, store, backend: str, index: index_lib.SearchIndex,
               labels: np.ndarray | None = None, metadata: dict | None = None):
    self._keys = keys
    self._store = store
    self._backend = backend
    self._index = index
    self._labels = labels
    self.metadata = {} if metadata is None else metadata

  # -- properties -----------------------------------------------------------------------------
  @property
  def size(self) -> int:
    return len(self._keys)

  @property
  def dim(self) -> int:
    return self._keys.dim

  @property
  def key_format(self) -> str:
    """How the keys are stored: ``float32``, ``bfloat16``, ``float16`` or ``int8`` (``keys.py``)."""
    return self._keys.format

  @property
  def num_outputs(self) -> int:
    return self._store.num_outputs

  @property
  def residual_format(self) -> str:
    return self._store.format

  @property
  def backend(self) -> str:
    return self._backend

  @property
  def backend_options(self) -> dict:
    """The index's saved options (JSON-ready; tuned query settings included; ``exact`` records
    only those given, its defaults following the devices), a copy."""
    return dict(self._index.options)

  @property
  def index(self) -> index_lib.SearchIndex:
    """The search index (query-time settings: ``query_settings``, ``set_query_settings``)."""
    return self._index

  @property
  def keys(self) -> np.ndarray:
    """The keys as searched, float32 ``[n, d]``: the stored array for ``float32``, else a decoded
    copy (as large as float32 keys)."""
    return self._keys.float32()

  @property
  def key_store(self) -> KeyStore:
    """The keys as stored."""
    return self._keys

  @property
  def labels(self) -> np.ndarray | None:
    """What each key memorizes (class or next token), int32 ``[n]``, or None."""
    return self._labels

  def labels_of(self, ids) -> np.ndarray:
    """What memory rows ``ids`` memorize (int32), for memories built with labels."""
    if self._labels is None:
      raise ValueError("this memory was built without labels")
    return self._labels[checks.row_ids(ids, self.size)]

  def bytes_per_example(self) -> dict:
    """Stored bytes per example: ``{"keys": ..., "residuals": ...}`` (+ ``"labels"``)."""
    out = {"keys": self._keys.bytes_per_row(),
           "residuals": self._store.bytes_per_example()}
    if self._labels is not None:
      out["labels"] = float(self._labels.itemsize)
    return out

  def __repr__(self):
    return (f"Memory(size={self.size}, dim={self.dim}, num_outputs={self.num_outputs}, "
            f"backend={self.backend!r}, residual_format={self.residual_format!r})")

  # -- search and rows ------------------------------------------------------------------------
  def search(self, queries, k: int):
    """k nearest keys by Euclidean distance.

    Returns ``(distances [q, k] float32, NOT squared, ascending; ids [q, k] int32)``: k distinct
    real ids per query, always. ``exact`` is exact; ``scann`` is approximate in which ids it
    returns but its distances are exactly those of the returned ids. Ties go to the lower id
    (``scann`` may return another of equally distant keys). Keys and queries may have any
    magnitude up to 2**100 (see :mod:`resmem_jax.memory.scaling`).
    """
    queries = checks.queries(queries, self.dim)
    k = checks.neighbour_count(k, self.size)
    if queries.shape[0] == 0:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    candidates = self._index.candidates(queries, k)
    name = type(self._index).__name__
    if candidates.ndim != 2 or candidates.shape[0] != queries.shape[0] or candidates.shape[1] < k:
      raise ValueError(f"{name}.candidates returned shape {candidates.shape} for "
                       f"{queries.shape[0]} queries and k={k}; an index must return at least "
                       "min(k, size) ids per query")
    if candidates.size and (int(candidates.min()) < -1 or int(candidates.max()) >= self.size):
      raise ValueError(f"{name}.candidates returned ids outside [0, {self.size}) (and -1 for "
                       "none); an index must return row numbers of its keys")
    distances, ids = rerank_exact(queries, self._keys, candidates, k)
    ordered = np.sort(ids, axis=1)
    if np.any((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)):
      raise ValueError(f"{name}.candidates returned the same id twice for some queries; an "
                       "index must return distinct ids")
    short = ids[:, -1] < 0  # the index could not answer these rows: search them exhaustively
    if short.any():
      distances[short], ids[short] = self._exhaustive(queries[short], k)
    return distances, ids

  def _exhaustive(self, queries: np.ndarray, k: int):
    """The k nearest keys of every key, for the few rows an index leaves short: the nearest
    ``k + PRESELECT_MARGIN`` of each slice of keys by a float64 expansion, then the exact
    re-rank of them all."""
    from resmem_jax.memory.exact import PRESELECT_MARGIN  # pylint: disable=g-import-not-at-top
    keep = min(self.size, k + PRESELECT_MARGIN)
    wide = queries.astype(np.float64)
    best = []
    for start in range(0, self.size, EXHAUSTIVE_ROWS):
      rows = self._keys.rows(start, start + EXHAUSTIVE_ROWS).astype(np.float64)
      scores = np.einsum("nd,nd->n", rows, rows)[None, :] - 2 * wide @ rows.T
      count = min(keep, rows.shape[0])
      part = np.argpartition(scores, count - 1, axis=1)[:, :count] if count < rows.shape[0] \
          else np.tile(np.arange(rows.shape[0]), (len(queries), 1))
      best.append(part + start)
    candidates = np.concatenate(best, axis=1).astype(np.int32)
    return rerank_exact(queries, self._keys, candidates, k)

  def residual_rows(self, ids):
    """The store's rows of memory ``ids``: ``(values float32 [..., C], None)`` for dense and
    bfloat16, ``(values float32 [..., m + 1], columns int32 [..., m + 1])`` for sparse."""
    return self._store.rows(checks.row_ids(ids, self.size))

  def gather_residuals(self, ids) -> np.ndarray:
    """Dense float32 residuals ``[..., C]`` of memory rows ``ids``."""
    return self._store.gather(checks.row_ids(ids, self.size))

  def tune_search(self, queries, k: int, target_recall: float = 0.99, **grids) -> dict:
    """Fastest query settings reaching ``target_recall`` (recall@k vs exact) on ``queries``.

    See :func:`resmem_jax.memory.tuning.tune_search`; the settings stay with this memory's index.
    """
    from resmem_jax.memory import tuning  # pylint: disable=g-import-not-at-top
    return tuning.tune_search(self, queries, k, target_recall, **grids)

  # -- editing --------------------------------------------------------------------------------
  def add(self, keys, residuals, labels=None) -> None:
    """Appends examples (memory editing); they are returned by the next search.

    ``labels`` are required exactly when the memory stores labels.
    """
    keys = checks.vectors(keys, "keys")
    residuals = checks.float_matrix(residuals, "residuals")
    if keys.shape[1] != self.dim:
      raise ValueError(f"keys have dimension {keys.shape[1]} but the memory keys have {self.dim}")
    if residuals.shape[1] != self.num_outputs:
      raise ValueError(f"residuals have {residuals.shape[1]} outputs but the memory has {self.num_outputs}")
    if keys.shape[0] != residuals.shape[0]:
      raise ValueError(f"keys has {keys.shape[0]} rows but residuals has {residuals.shape[0]}")
    if (labels is None) != (self._labels is None):
      raise ValueError("this memory stores labels: pass labels for the added keys"
                       if labels is None else
                       "this memory has no labels; build it with labels= to store them")
    if labels is not None:
      labels = np.concatenate([self._labels, checks.labels(labels, keys.shape[0], self.num_outputs)])
    all_keys = self._keys.with_rows(keys)
    index = self._index.extend(all_keys)
    # A copy: the store may be shared with the caller (memory_from_store, with_store).
    store = copy.copy(self._store)
    store.append(residuals)
    self._keys, self._index, self._store, self._labels = all_keys, index, store, labels

  def with_residuals(self, residuals, metadata=None) -> Memory:
    """A memory over the same keys and search index with new residual values.

    For residuals recomputed at another temperature: the index (a ScaNN build can take minutes)
    is shared, not rebuilt. ``residuals`` is an ``[n, C]`` array or an iterable of row chunks in
    order (so a large-vocabulary sparse memory never holds all dense rows at once). The format
    (and ``top_m``) stay those of this memory; ``metadata`` defaults to this memory's.
    """
    chunks = [residuals] if hasattr(residuals, "shape") else residuals
    store = None
    for chunk in chunks:
      chunk = checks.float_matrix(chunk, "residuals")
      if chunk.shape[1] != self.num_outputs:
        raise ValueError(f"residuals have {chunk.shape[1]} outputs but the memory has {self.num_outputs}")
      if store is None:
        store = store_lib.make_store(chunk, self.residual_format, getattr(self._store, "top_m", None))
      else:
        store.append(chunk)
    if store is None:
      raise ValueError(f"residuals have 0 rows but the memory has {self.size} keys")
    return self.with_store(store, metadata)

  def with_store(self, store, metadata=None) -> Memory:
    """A memory over the same keys and search index with a ready residual store (one row per
    key; from :func:`~resmem_jax.memory.store.store_from_arrays` or ``make_store``).
    ``metadata`` defaults to this memory's."""
    _check_store(store, self.size)
    if store.num_outputs != self.num_outputs:
      raise ValueError(f"the store has {store.num_outputs} outputs but the memory has {self.num_outputs}")
    metadata = self.metadata if metadata is None else _json_metadata(metadata)
    # Sharing the index is safe: an index never changes its keys (add builds a new one).
    return Memory(self._keys, store, self._backend, self._index, self._labels, metadata)

  # -- persistence ----------------------------------------------------------------------------
  def save(self, path) -> None:
    """Writes the memory to folder ``path``: a kill at any instant leaves the old or the new
    memory there (see :mod:`resmem_jax.memory.io`). ``path`` must be missing, an empty folder or
    a memory saved before; anything else is refused (ValueError) and left untouched."""
    io.save(path, self._keys, self._labels, self._store, self._backend, self._index, self.metadata)


def _check_store(store, n: int) -> None:
  if not isinstance(store, (store_lib.DenseStore, store_lib.SparseStore)):
    raise ValueError(f"store must be a residual store (resmem_jax.memory.store), got "
                     f"{type(store).__name__}")
  if len(store) != n:
    raise ValueError(f"residuals have {len(store)} rows but the memory has {n} keys")


def _checked_labels(labels, n: int, num_outputs: int):
  return None if labels is None else checks.labels(labels, n, num_outputs)


def build_memory(keys, residuals, backend: str = "exact", residual_format: str = "dense",
                 top_m: int | None = None, labels=None, metadata=None, key_format: str = "float32",
                 **backend_options) -> Memory:
  """Builds a ResMem memory.

  Args:
    keys: embeddings ``[n, d]`` (floating point, finite).
    residuals: residuals ``[n, C]`` (see :func:`resmem_jax.core.residuals.residuals`).
    backend: one of :data:`BACKENDS` (``"exact"``, ``"scann"``).
    residual_format: ``"dense"`` (float32), ``"bfloat16"``, ``"sparse"`` (true label + ``top_m``
      largest probabilities) or ``"sparse_float16"`` (the same, float16 values); see
      :mod:`resmem_jax.memory.store` for their error bounds.
    top_m: entries kept by the sparse formats besides the label (default 16); ignored otherwise.
    labels: optional int ``[n]`` in ``[0, C)``: what each key memorizes (the kNN-LM head reads
      them); saved with the memory and extended by :meth:`Memory.add`.
    metadata: JSON-serialisable dict (e.g. the producing model's config and step), saved in the
      manifest.
    key_format: how the keys are stored, one of :data:`KEY_FORMATS` (``float32``, ``bfloat16``,
      ``float16``, ``int8``; see :mod:`resmem_jax.memory.keys` for their sizes and errors).
    **backend_options: the backend's ``OPTION_NAMES`` (``exact``: block_size, query_chunk,
      query_tile, calls_in_flight, devices; ``scann``: see
      :data:`resmem_jax.memory.scann.OPTION_NAMES`).
  """
  index_cls = index_lib.index_class(backend)
  index_lib.check_choice("residual_format", residual_format, FORMATS)
  index_lib.check_choice("key_format", key_format, KEY_FORMATS)
  keys = checks.vectors(keys, "keys")
  residuals = checks.float_matrix(residuals, "residuals")
  if keys.shape[0] != residuals.shape[0]:
    raise ValueError(f"keys has {keys.shape[0]} rows but residuals has {residuals.shape[0]}")
  if residual_format in store_lib.SPARSE_FORMATS:
    top_m = DEFAULT_TOP_M if top_m is None else top_m
    if isinstance(top_m, bool) or not isinstance(top_m, (int, np.integer)) or top_m < 1:
      raise ValueError(f"top_m must be a positive integer, got {top_m!r}")
  options = index_cls.check_options(backend_options)
  labels = _checked_labels(labels, keys.shape[0], residuals.shape[1])
  metadata = _json_metadata(metadata)
  store = store_lib.make_store(residuals, residual_format, top_m)
  key_store = KeyStore.from_float32(keys, key_format)
  del keys  # a compact format keeps only its codes
  return Memory(key_store, store, backend, index_cls.build(key_store, options), labels, metadata)


def memory_from_store(keys, store, backend: str = "exact", labels=None, metadata=None,
                      key_format: str = "float32", **backend_options) -> Memory:
  """A memory over ``keys`` with a ready residual store (the engine's path: the rows were
  computed on the device, see :func:`~resmem_jax.memory.store.store_from_arrays`). Arguments as
  :func:`build_memory`."""
  index_cls = index_lib.index_class(backend)
  index_lib.check_choice("key_format", key_format, KEY_FORMATS)
  if isinstance(keys, KeyStore):  # already stored (a streamed build): checked as it was coded
    key_store = keys
  else:
    key_store = KeyStore.from_float32(checks.vectors(keys, "keys"), key_format)
  if key_store.format != key_format:
    raise ValueError(f"keys are stored as {key_store.format}, key_format says {key_format}")
  del keys
  _check_store(store, len(key_store))
  options = index_cls.check_options(backend_options)
  labels = _checked_labels(labels, len(key_store), store.num_outputs)
  metadata = _json_metadata(metadata)
  return Memory(key_store, store, backend, index_cls.build(key_store, options), labels, metadata)


def load_memory(path) -> Memory:
  """Loads a memory written by :meth:`Memory.save`, verifying its manifest, sizes and checksums
  (FileNotFoundError when ``path`` holds no memory, ValueError when it is damaged)."""
  keys, labels, store, backend, index, metadata = io.load(path)
  return Memory(keys, store, backend, index, labels, metadata)


def parse_backend_options(text: str) -> dict:
  """``"mode=tree_ah,num_leaves=235,reorder=300"`` -> {"mode": "tree_ah", "num_leaves": 235, ...}.

  A string (not a nested ConfigDict) so any option can be set from the command line with
  ``--config.resmem.backend_options=...``; values that parse as int or float become numbers.
  """
  if not isinstance(text, str):
    raise ValueError(f"resmem.backend_options must be a string 'key=value,...', got {text!r}")
  options: dict[str, str | int | float] = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    if "=" not in item:
      raise ValueError(f"resmem.backend_options entries must be key=value, got {item!r}")
    key, raw = (x.strip() for x in item.split("=", 1))
    value: str | int | float = raw
    for cast in (int, float):
      try:
        value = cast(raw)
        break
      except ValueError:
        pass
    options[key] = value
  return options


def check_options(backend: str, backend_options: str | dict, residual_format: str,
                  key_format: str = "float32") -> dict:
  """The checked backend options of a config, without building anything or importing ScaNN.

  ValueError naming ``resmem.backend``, ``resmem.backend_options`` or ``resmem.residual_format``
  on an unknown backend, option name, option value or residual format.
  """
  index_cls = index_lib.index_class(backend, "resmem.backend")
  index_lib.check_choice("resmem.residual_format", residual_format, FORMATS)
  index_lib.check_choice("resmem.key_format", key_format, KEY_FORMATS)
  if index_cls.REQUIRES is not None:
    import importlib.util  # pylint: disable=g-import-not-at-top
    module, extra = index_cls.REQUIRES
    if importlib.util.find_spec(module) is None:
      from resmem_jax import settings  # pylint: disable=g-import-not-at-top
      raise settings.MissingDependency(
          f"resmem.backend={backend!r} needs the {module} package, which is not installed: pip "
          f"install 'resmem_jax[{extra}]', or set resmem.backend=exact")
  options = (parse_backend_options(backend_options) if isinstance(backend_options, str)
             else dict(backend_options))
  try:
    return index_cls.check_options(options)
  except ValueError as err:
    raise ValueError(f"resmem.backend_options={backend_options!r}: {err}") from None


def check_size(backend: str, num_keys: int, backend_options: str | dict) -> None:
  """ValueError when a ``backend`` index with these options cannot be built over ``num_keys``
  keys (scann: a tree needs at least 16 keys and a sample point per leaf), known before any key
  exists. Does not import ScaNN."""
  index_cls = index_lib.index_class(backend)
  options = (parse_backend_options(backend_options) if isinstance(backend_options, str)
             else dict(backend_options))
  if hasattr(index_cls, "check_size"):
    index_cls.check_size(int(num_keys), options)


def has_query_settings(backend: str, num_keys: int, backend_options: dict) -> bool:
  """Whether a ``backend`` memory of ``num_keys`` keys built with ``backend_options`` (a dict, as
  :func:`parse_backend_options` returns) has query-time settings to tune (scann: unless it
  searches by brute force). Does not import ScaNN."""
  return index_lib.index_class(backend).has_query_settings(num_keys, backend_options)
