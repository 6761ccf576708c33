"""Approximate nearest-neighbour search with ScaNN, plus an exact side buffer for added keys.

Euclidean search is reduced to maximum inner product search (MIPS): after centring the keys
(L2 distance is translation invariant, and centring keeps the extra coordinate small) and, if
extreme, scaling them by a power of two (:mod:`resmem_jax.memory.scaling`: no overflow at any
magnitude), ``|q - k|^2 = |q|^2 - 2 (q.k - |k|^2 / 2)``, so with ``k' = [k, -|k|^2 / 2]`` and
``q' = [q, 1]`` (times ``2**-m`` for a query far larger than every key) the nearest key is the one
with the largest ``q'.k'``. ScaNN's anisotropic quantization is built for inner products; on
clustered 1M x 64 data it gave much higher recall this way than ScaNN's ``squared_l2`` mode (see
experiments/bench_memory.py, ``--scann_distance``).

Keys stored once: ScaNN holds only its partition and its AH codes (4 bits per block), never a
float copy of the keys. At d = 128 with ``dims_per_block=1`` that is about 126 bytes per row in RAM
right after the streamed build (ScaNN's upserts leave slack) and 73-77 once the memory has been saved:
a save reads the index back from the files it wrote (:mod:`resmem_jax.memory.scann_files`, same
answers), and a loaded memory is read from them too. On disk 69 bytes per row: the codes packed
two to a byte, where ScaNN writes one. About half of each with ``dims_per_block=2``. ScaNN's
serializer needs about 480 bytes per row above the built memory while it saves (at 10M rows).
Its ``reorder`` depth is the number of AH candidates it hands the memory, which re-ranks them by
directly computed distance from its own keys (:func:`~resmem_jax.memory.exact.rerank_exact`, in
whatever key format the memory stores), so distances are exact for the stored keys. Before,
ScaNN re-scored its candidates from its own float copy, about 40% of the memory's RAM.

A streamed build: ScaNN trains its tree and quantizer on a random sample of
``training_sample_size`` keys (the only float32 keys held at once besides one slice of
``ROWS_PER_UPSERT``), then every key is added in order, slice by slice (ScaNN's upsert), so its
ids are the memory's row numbers and the build needs no float32 copy of all keys.

Parameters follow ScaNN's published guidance, from the number of keys ``n``:
  n < 100k: brute force; otherwise: tree partitioning (about sqrt(n) leaves) + AH + exact
  reorder. ScaNN's own guidance switches to AH at about 20k; on real ReLU embeddings of MNIST MLPs
  (55k keys) AH + reorder 300 reached only recall@10 0.73 / 0.98 / 0.98 at d = 8 / 64 / 256 while
  brute force was exact *and* faster (80k / 20k / 2.8k queries/s vs 45k / 13k / 2.0k), so brute
  force is kept up to 100k. ``mode="ah"`` remains available as an option.
Recall is governed by ``leaves_to_search`` and ``reorder`` (re-scored candidates, stated for
k = 10; deeper k re-scores ``3 (k - 10)`` more); every parameter can be overridden through
``build_memory(..., backend="scann", **options)``. Real embeddings can need other settings than
the clustered benchmark data: both act at query time, so :func:`resmem_jax.memory.tuning.tune_search`
sweeps them on real queries (:meth:`ScannIndex.query_settings_grid`).

Short results: where the searched leaves hold fewer than k points, ScaNN pads its answer (id 0
with a NaN score, repeated). Such rows are searched again over every leaf; a row still short
(and a ``squared_l2`` query too large for ScaNN's float32) is handed back as -1 and the memory
searches it exhaustively, so a search always returns k distinct real neighbours.

Limit (rounding): ScaNN scores every mode, brute force included, by the float32 expansion above
and has no error certificate, so where the keys' distance from their mean R is large next to the
gaps between near neighbours (roughly R^2 d 2^-24 above their squared gap) it returns wrong
neighbours, and ``reorder`` cannot help (it re-scores with the same expansion). Two clusters at
+-S, spread 0.01, d = 8: recall@10 0.996 at S = 1, 0.72 at S = 10, 0.01 at S = 1000
(tests/test_memory_scann_limits.py). ``exact`` and ``approx`` certify their candidates and stay
exact there: use them for such keys.

Memory editing: keys added after the build go to a side buffer (an :class:`ExactIndex` over
float32 copies of the added keys only) searched exactly beside ScaNN, so they are neighbours at
once and never missed; the ScaNN index is rebuilt
over everything only when the buffer outgrows ``max(1024, indexed / 10)`` keys (a rebuild of 1M
keys costs about a minute, searching a small buffer exactly costs little). Options given at build
time or set as query settings carry over to the rebuild; the rest are derived again from the new n.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np

from resmem_jax import quiet
from resmem_jax.memory import index as index_lib
from resmem_jax.memory import scaling
from resmem_jax.memory import scann_files
from resmem_jax.memory.exact import ExactIndex
from resmem_jax.memory.keys import KeyStore

log = logging.getLogger(__name__)

OPTION_NAMES = ("mode", "distance", "num_leaves", "leaves_to_search", "reorder",
                "dims_per_block", "quantization_threshold", "training_sample_size",
                "num_threads")
MODES = ("brute_force", "ah", "tree_ah")
DISTANCES = ("mips_l2", "squared_l2")
# integer options -> their smallest valid value
INTEGER_OPTIONS = {"num_leaves": 1, "leaves_to_search": 1, "reorder": 0, "dims_per_block": 1,
                   "training_sample_size": 1, "num_threads": 0}

# ScaNN keeps its counts as int32.
INT32_MAX = 2**31 - 1
# ScaNN starts this many training threads whatever the core count (50000 never finished building);
# a fixed bound, above any one host's cores, keeps a config valid on every machine.
MAX_THREADS = 1024
# AH learns 16 centres per block (4-bit codes) from its sample, so it needs at least 16 points.
AH_CENTRES = 16
# ScaNN draws the AH sample at random at rate training_sample_size / n: at 64 the chance of fewer
# than 16 points is negligible (ScaNN refuses fewer in a message about "clusters per block").
MIN_TRAINING_SAMPLE = 64

BRUTE_FORCE_BELOW = 100_000
# Keys transformed and added to ScaNN per step of a build (float32 temporaries: 26 MB at d = 128).
ROWS_PER_UPSERT = 50_000
UPSERT_BATCH = 1_000  # ScaNN's own batch within an upsert

# Query settings swept by tune_search (each cheapest first).
LEAVES_GRID = (2, 4, 8, 12, 16, 24, 32, 48, 64, 96)
REORDER_GRID = (25, 50, 100, 150, 200, 300, 400, 600, 800)


def default_options(n: int, mode: str | None = None) -> dict:
  """ScaNN parameters for ``n`` keys (see the module docstring); ``mode`` forces a mode."""
  if mode == "brute_force" or (mode is None and n < BRUTE_FORCE_BELOW):
    return {"mode": "brute_force", "distance": "mips_l2", "reorder": 0}
  # dims_per_block=1 reached recall@10 >= 0.99 on clustered 100k points at about twice the
  # speed of dims_per_block=2 with the (much deeper) reorder that one needs.
  options = {"distance": "mips_l2", "dims_per_block": 1, "quantization_threshold": 0.2,
             "training_sample_size": min(n, 250_000), "num_threads": 0}
  # Measured on clustered points (experiments/bench_memory.py, BUILD_NOTES.md): past a few
  # leaves recall stops improving and is set by the reorder depth (1M x 64, 25 of 1000
  # leaves: reorder 150 / 300 / 500 -> recall@10 0.975 / 0.995 / 0.999; 100k x 128, 8 of 316
  # leaves: reorder 100 / 150 / 200 / 300 -> 0.986 / 0.996 / 0.998 / 1.000), while each extra
  # leaf or re-scored candidate costs speed. Hence few leaves and a reorder depth growing with
  # log n: 150 at 100k, 500 at 1M.
  num_leaves = int(round(math.sqrt(n)))
  reorder = int(round(150 + 350 * max(0.0, math.log10(n / 100_000))))
  if mode == "ah":
    options.update(mode="ah", reorder=reorder)
  else:
    options.update(mode="tree_ah", num_leaves=num_leaves,
                   leaves_to_search=max(8, num_leaves // 40), reorder=reorder)
  return options


def _resolve(n: int, requested: dict) -> dict:
  """The defaults for ``n`` keys overridden by the ``requested`` (checked) options."""
  options = default_options(n, requested.get("mode"))
  options.update(requested)
  return options


def _tree_leaves(size: int, opts: dict) -> int:
  """The leaves a tree over ``size`` keys gets: ``num_leaves``, at most one per 50 keys."""
  return min(int(opts["num_leaves"]), max(1, size // 50))


def check_size(size: int, requested: dict) -> None:
  """ValueError when ScaNN cannot train an index with the (checked) ``requested`` options on
  ``size`` keys; ScaNN's own message would name its internals."""
  opts = _resolve(size, requested)
  if opts["mode"] == "brute_force":
    return  # nothing to train
  sample = min(size, int(opts["training_sample_size"]))
  if sample < min(size, MIN_TRAINING_SAMPLE):  # a random sample that may hold < 16 points
    raise ValueError(f"scann option training_sample_size={opts['training_sample_size']} is too "
                     f"small: AH learns {AH_CENTRES} centres per block from a random sample of "
                     f"about that many of the {size} keys; set it >= {MIN_TRAINING_SAMPLE}")
  if opts["mode"] != "tree_ah":
    return  # "ah" over all of a few keys works
  if size < AH_CENTRES:
    raise ValueError(f"scann mode tree_ah needs at least {AH_CENTRES} keys (its quantizer learns "
                     f"{AH_CENTRES} centres per block), got {size}; use mode=brute_force (exact, "
                     "and fast at this size)")
  leaves = _tree_leaves(size, opts)
  if sample < leaves:
    raise ValueError(f"scann option training_sample_size={opts['training_sample_size']} is below "
                     f"the tree's {leaves} leaves (its k-means needs a sample point per leaf); "
                     f"set training_sample_size >= {leaves} or num_leaves <= {sample}")


def _import_scann():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    from resmem_jax import settings  # pylint: disable=g-import-not-at-top
    raise settings.MissingDependency(
        f"the scann backend needs ScaNN ({err}): pip install 'resmem_jax[scann]', or use the exact "
        "backend") from None
  return scann_ops_pybind




# squared_l2 compares a query and a key on the keys' scale: a query whose entries are beyond
# 2**SQUARED_L2_MAX_EXPONENT there could overflow ScaNN's float32 distances and is searched exactly.
SQUARED_L2_MAX_EXPONENT = 40


def _transform_rows(rows: np.ndarray, center: np.ndarray, exponent: int, distance: str):
  """ScaNN's database rows for float32 key ``rows``: centred, scaled, (mips_l2) augmented."""
  centred = scaling.scaled(rows - center, exponent)
  if distance == "squared_l2":
    return centred
  half_norm = -0.5 * np.einsum("nd,nd->n", centred, centred)
  return np.concatenate([centred, half_norm[:, None]], axis=1).astype(np.float32)


def _key_statistics(keys) -> tuple[np.ndarray, int]:
  """``(the keys' mean, their scale exponent)``, read slice by slice."""
  total = np.zeros(keys.dim, np.float64)
  for start in range(0, len(keys), ROWS_PER_UPSERT):
    total += keys.rows(start, start + ROWS_PER_UPSERT).sum(axis=0, dtype=np.float64)
  center = (total / len(keys)).astype(np.float32)
  largest = 0.0
  for start in range(0, len(keys), ROWS_PER_UPSERT):
    centred = keys.rows(start, start + ROWS_PER_UPSERT) - center
    largest = max(largest, float(np.abs(centred).max()))
  return center, scaling.key_exponent(np.array([largest], np.float32))


def _transform_queries(queries: np.ndarray, center: np.ndarray, exponent: int, distance: str):
  """``(transformed queries, rows too large for ScaNN)``."""
  centred = (queries - center).astype(np.float32)
  if distance == "squared_l2":
    scaled = scaling.scaled(centred, exponent)
    rows = np.zeros(len(queries), np.int32)
    if scaled.size:
      rows = scaling.exponent(np.maximum(scaled.max(axis=1), -scaled.min(axis=1)))
    too_large = rows > SQUARED_L2_MAX_EXPONENT
    return np.where(too_large[:, None], np.float32(0), scaled), too_large
  scaled, weights = scaling.scaled_queries(centred, exponent)
  return (np.concatenate([scaled, weights[:, None]], axis=1),
          np.zeros(len(queries), bool))


def _build_searcher(keys, center: np.ndarray, exponent: int, opts: dict, seed: int = 0):
  """A ScaNN searcher over every key of the :class:`~resmem_jax.memory.keys.KeyStore` ``keys``."""
  scann = _import_scann()
  size = len(keys)
  distance = opts["distance"]
  measure = "dot_product" if distance == "mips_l2" else "squared_l2"

  def transformed(ids=None, start=0, stop=size):
    rows = keys.rows(start, stop) if ids is None else keys.take(ids)
    return _transform_rows(rows, center, exponent, distance)

  if opts["mode"] == "brute_force":
    # Below BRUTE_FORCE_BELOW keys: ScaNN keeps this float copy (small at that size).
    with quiet.hidden_output():
      return scann.builder(transformed(), 10, measure).score_brute_force().build()
  # Train on a random sample, then add every key in order: ids are the memory's row numbers.
  sample_size = min(size, int(opts["training_sample_size"]))
  rng = np.random.default_rng(seed)
  sample = np.sort(rng.choice(size, sample_size, replace=False)) if sample_size < size \
      else np.arange(size)
  # num_neighbors is only the default; every search passes its own count.
  builder = scann.builder(transformed(sample), 10, measure)
  if opts.get("num_threads"):
    builder = builder.set_n_training_threads(int(opts["num_threads"]))
  if opts["mode"] == "tree_ah":
    num_leaves = _tree_leaves(size, opts)
    builder = builder.tree(num_leaves=num_leaves,
                           num_leaves_to_search=min(int(opts["leaves_to_search"]), num_leaves),
                           training_sample_size=sample_size)
  threshold = float(opts["quantization_threshold"]) if measure == "dot_product" else float("nan")
  builder = builder.score_ah(int(opts["dims_per_block"]), anisotropic_quantization_threshold=threshold,
                             training_sample_size=sample_size)
  with quiet.hidden_output():
    searcher = builder.build()
    del builder
    # The sample's points leave (ScaNN deletes by swapping with the last, so last first) and
    # every key is added in row order.
    searcher.searcher.delete(list(range(sample_size - 1, -1, -1)))
    for start in range(0, size, ROWS_PER_UPSERT):
      rows = transformed(start=start, stop=min(size, start + ROWS_PER_UPSERT))
      searcher.searcher.upsert([None] * len(rows), rows, UPSERT_BATCH)
  if searcher.size() != size:
    raise RuntimeError(f"ScaNN holds {searcher.size()} points after adding {size} keys")
  return searcher


def _check_integer_range(name: str, value: int) -> None:
  if name == "num_threads" and value > MAX_THREADS:
    raise ValueError(f"scann option num_threads must be at most {MAX_THREADS} (ScaNN starts that "
                     f"many threads; this host has {os.cpu_count()} cores), got {value}")
  if value > INT32_MAX:
    raise ValueError(f"scann option {name} must be at most 2**31 - 1 (ScaNN counts in int32), "
                     f"got {value}")


def _short_rows(ids: np.ndarray, k: int) -> np.ndarray:
  """Rows with fewer than k distinct real ids (ScaNN pads a short answer)."""
  ordered = np.sort(ids, axis=1)
  repeated = np.any((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0), axis=1)
  return repeated | ((ids >= 0).sum(axis=1) < k)


def _buffer(keys, indexed: int) -> ExactIndex:
  """Exact search over keys ``indexed:`` (those added after ScaNN's build), as float32."""
  return ExactIndex.build(KeyStore("float32", keys.rows(indexed, len(keys))), {})


class ScannIndex(index_lib.SearchIndex):
  """A ScaNN searcher over the first ``indexed`` keys, and an exact buffer over the rest.

  ``requested`` holds the options given at build time plus query settings set since (kept by a
  rebuild); ``options`` is them resolved against the defaults for ``indexed`` keys. It keeps no
  keys: the memory re-ranks its candidates and answers the rows it leaves short.
  """

  OPTION_NAMES = OPTION_NAMES
  REQUIRES = ("scann", "scann")
  INFO_NAMES = ("indexed", "center", "scale_exponent", "requested", "options",
                "packed_code_columns")
  OPTIONAL_INFO = ("packed_code_columns",)  # absent from indexes saved before it existed

  def __init__(self, searcher, indexed: int, center: np.ndarray, exponent: int,
               requested: dict, options: dict, buffer: ExactIndex | None = None,
               upserted: bool = False):
    self.searcher = searcher
    # Built by ScaNN's upsert: slack that reading the saved files back drops (scann_files).
    self.upserted = upserted
    self.indexed = int(indexed)
    self.center = center
    self.exponent = int(exponent)
    self.requested = requested
    self.options = options
    self.buffer = buffer
    self.size = self.indexed + (0 if buffer is None else buffer.size)

  @classmethod
  def check_options(cls, options: dict) -> dict:
    index_lib.check_option_names("scann backend options", options, OPTION_NAMES)
    checked = {}
    for name, value in options.items():
      if name == "mode":
        index_lib.check_choice("scann option mode", value, MODES)
      elif name == "distance":
        index_lib.check_choice("scann option distance", value, DISTANCES)
      elif name == "quantization_threshold":
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
            or not math.isfinite(value):
          raise ValueError(f"scann option quantization_threshold must be a finite number, "
                           f"got {value!r}")
        value = float(value)
      else:
        value = index_lib.integer_option("scann", name, value, INTEGER_OPTIONS[name])
        _check_integer_range(name, value)
      checked[name] = value
    return checked

  @classmethod
  def check_size(cls, num_keys: int, options: dict) -> None:
    check_size(num_keys, cls.check_options(options))

  @classmethod
  def has_query_settings(cls, num_keys: int, options: dict) -> bool:
    return _resolve(num_keys, cls.check_options(options))["mode"] != "brute_force"

  @classmethod
  def build(cls, keys, options: dict) -> ScannIndex:
    requested = cls.check_options(options)
    check_size(len(keys), requested)
    resolved = _resolve(len(keys), requested)
    center, exponent = _key_statistics(keys)
    searcher = _build_searcher(keys, center, exponent, resolved)
    return cls(searcher, len(keys), center, exponent, requested, resolved,
               upserted=resolved["mode"] != "brute_force")

  def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
    """ScaNN's AH candidates for the indexed keys, then the buffer's (exact, with spare ones)."""
    ids = self._scann_candidates(queries, min(k, self.indexed))
    if self.buffer is not None:
      extra = self.buffer.candidates(queries, k)
      ids = np.concatenate([ids, np.where(extra >= 0, extra + self.indexed, -1)], axis=1)
    return ids

  def candidate_count(self, k: int) -> int:
    """AH candidates handed to the memory for k neighbours: ``reorder`` is the depth for k = 10;
    a deeper k needs more (100k x 128, 150 candidates: recall@32 0.974, recall@128 0.781; 128
    needs about 400 for 0.99). Never more than the keys, never fewer than k."""
    depth = int(self.options.get("reorder") or 0) + 3 * max(0, k - 10)
    if self.options["mode"] == "brute_force":
      depth = k  # exact scores: nothing to re-rank
    return min(max(depth, k), max(k, self.indexed))

  def _scann_candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
    """``[q, >= k]`` ids in ``[0, indexed)``, -1 where ScaNN had no answer."""
    if queries.shape[0] == 0:  # ScaNN rejects an empty batch with a misleading shape error
      return np.zeros((0, k), np.int32)
    opts = self.options
    count = self.candidate_count(k)
    transformed, unanswerable = _transform_queries(queries, self.center, self.exponent,
                                                   opts["distance"])
    leaves = int(opts["leaves_to_search"]) if opts["mode"] == "tree_ah" else None
    ids = self._search(transformed, count, leaves)
    short = unanswerable | _short_rows(ids, k)
    if opts["mode"] == "tree_ah" and short.any():
      # Too few points in the searched leaves: search every leaf for those rows.
      again = short & ~unanswerable
      if again.any():
        ids[again] = self._search(transformed[again], count, int(opts["num_leaves"]))
    ids[unanswerable] = -1  # the memory searches these rows exhaustively
    return ids

  def _search(self, transformed: np.ndarray, count: int, leaves: int | None) -> np.ndarray:
    """ScaNN's ids ``[q, count]``, its padding (id 0 at a NaN score, beyond the points it
    found) as -1."""
    kwargs = {"final_num_neighbors": count}
    if leaves is not None:
      kwargs["leaves_to_search"] = leaves
    if len(transformed) >= 256:
      ids, scores = self.searcher.search_batched_parallel(transformed, **kwargs)
    else:
      ids, scores = self.searcher.search_batched(transformed, **kwargs)
    ids = np.asarray(ids, np.int64)
    real = np.isfinite(np.asarray(scores)) & (ids >= 0) & (ids < self.indexed)
    out = np.full((len(transformed), count), -1, np.int32)
    out[:, :ids.shape[1]] = np.where(real, ids, -1)
    return out

  def extend(self, keys) -> ScannIndex:
    added = len(keys) - self.indexed
    if added > max(1024, self.indexed // 10):
      return ScannIndex.build(keys, self.requested)
    # The searcher is shared, never mutated: this index and the new one both stay valid.
    buffer = _buffer(keys, self.indexed) if added else None
    return ScannIndex(self.searcher, self.indexed, self.center, self.exponent,
                      dict(self.requested), dict(self.options), buffer, self.upserted)

  def save(self, directory: str) -> dict:
    with quiet.hidden_output():
      columns = scann_files.write(self.searcher, directory)
      if self.upserted:
        # The same index read back holds 30-50 B per row less (scann_files). It replaces the
        # searcher only once read whole; if it cannot be read (no room to unpack the codes), the
        # save stands and this index stays as built.
        try:
          self.searcher = scann_files.read(_import_scann(), directory, columns)
          self.upserted = False
        except OSError as err:
          log.warning("kept the ScaNN index as built (about 50 B per row more RAM): reading "
                      "it back from %s failed: %s", directory, err)
    # The buffer is not saved: it is rebuilt from the memory's keys after the first `indexed`.
    return {"indexed": self.indexed, "center": self.center.tolist(),
            "scale_exponent": self.exponent, "requested": dict(self.requested),
            "options": dict(self.options), "packed_code_columns": columns}

  @classmethod
  def load(cls, directory: str, keys, info: dict) -> ScannIndex:
    n = len(keys)
    index_lib.check_option_names("scann index info", info, cls.INFO_NAMES)
    missing = [name for name in cls.INFO_NAMES
               if name not in info and name not in cls.OPTIONAL_INFO]
    if missing:
      raise ValueError(f"scann index info lacks {missing}")
    indexed, exponent = info["indexed"], info["scale_exponent"]
    for name, value in (("indexed", indexed), ("scale_exponent", exponent)):
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"scann index info {name} must be an integer, got {value!r}")
    if not 0 < indexed <= n:
      raise ValueError(f"scann indexed count {indexed} is not in [1, {n}]")
    center = np.asarray(info["center"], np.float32)
    if center.shape != (keys.dim,):
      raise ValueError(f"scann center has shape {center.shape}, the keys have dimension "
                       f"{keys.dim}")
    if not np.all(np.isfinite(center)):
      raise ValueError("scann center holds NaN or inf")
    if not (isinstance(info["requested"], dict) and isinstance(info["options"], dict)):
      raise ValueError("scann index info requested and options must be dicts")
    requested = cls.check_options(info["requested"])
    options = _resolve(indexed, cls.check_options(info["options"]))
    # load_searcher writes a scann_assets.pbtxt of its own into a folder lacking one.
    if not os.path.isfile(os.path.join(directory, "scann_assets.pbtxt")):
      raise ValueError(f"{directory} holds no ScaNN index (scann_assets.pbtxt is missing)")
    columns = info.get("packed_code_columns")
    if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int)
                                or columns < 1):
      raise ValueError(f"scann index info packed_code_columns must be a positive integer or "
                       f"null, got {columns!r}")
    try:
      scann = _import_scann()
      with quiet.hidden_output():
        searcher = scann_files.read(scann, directory, columns)
    except RuntimeError as err:
      raise ValueError(f"ScaNN cannot load the index in {directory}: {err}") from None
    if searcher.size() != indexed:
      raise ValueError(f"scann index in {directory} holds {searcher.size()} points but the "
                       f"manifest says {indexed}")
    buffer = _buffer(keys, indexed) if indexed < n else None
    return cls(searcher, indexed, center, exponent, requested, options, buffer)

  # -- query-time settings --------------------------------------------------------------------
  def _check_tunable(self) -> None:
    if self.options["mode"] == "brute_force":
      raise ValueError("this scann memory searches by brute force (exact); build it with "
                       "mode='tree_ah' or mode='ah' to have settings to tune")

  def query_settings_grid(self, **grids) -> list[list[dict]]:
    """One sweep of increasing ``reorder`` per ``leaves_to_search`` (tree_ah), or one sweep (ah).

    ``grids``: ``leaves_grid`` (default ``LEAVES_GRID``), ``reorder_grid`` (``REORDER_GRID``).
    """
    index_lib.check_option_names("scann query settings grids", grids,
                                 ("leaves_grid", "reorder_grid"))
    leaves_grid = grids.get("leaves_grid", LEAVES_GRID)
    reorder_grid = grids.get("reorder_grid", REORDER_GRID)
    self._check_tunable()
    reorders = sorted({int(r) for r in reorder_grid})
    if self.options["mode"] != "tree_ah":
      return [[{"reorder": r} for r in reorders]]
    num_leaves = int(self.options["num_leaves"])
    leaves = sorted({min(int(v), num_leaves) for v in leaves_grid})
    return [[{"leaves_to_search": leaf, "reorder": r} for r in reorders] for leaf in leaves]

  def query_settings(self) -> dict:
    """``{"leaves_to_search": int | None (no tree), "reorder": int}``."""
    tree = self.options["mode"] == "tree_ah"
    return {"leaves_to_search": int(self.options["leaves_to_search"]) if tree else None,
            "reorder": int(self.options.get("reorder") or 0)}

  def set_query_settings(self, **settings) -> None:
    self._check_tunable()
    index_lib.check_option_names("scann query settings", settings, ("leaves_to_search", "reorder"))
    tree = self.options["mode"] == "tree_ah"
    if "leaves_to_search" in settings:
      if settings["leaves_to_search"] is None and not tree:
        del settings["leaves_to_search"]  # "no tree", as query_settings reports it for ah
      elif not tree:
        raise ValueError(f"scann option leaves_to_search needs mode tree_ah, this index is "
                         f"{self.options['mode']}")
    checked = self.check_options(settings)
    self.options.update(checked)
    self.requested.update(checked)  # a rebuild after Memory.add keeps them
