"""Approximate nearest-neighbour search with ScaNN, plus an exact side buffer for added keys.

Euclidean search is reduced to maximum inner product search (MIPS): after centring the keys
(L2 distance is translation invariant, and centring keeps the extra coordinate small) and, if
extreme, scaling them by a power of two (:mod:`resmem_jax.memory.scaling`: no overflow at any
magnitude), ``|q - k|^2 = |q|^2 - 2 (q.k - |k|^2 / 2)``, so with ``k' = [k, -|k|^2 / 2]`` and
``q' = [q, 1]`` (times ``2**-m`` for a query far larger than every key) the nearest key is the one
with the largest ``q'.k'``. ScaNN's anisotropic quantization is built for inner products; on
clustered 1M x 64 data it gave much higher recall this way than ScaNN's ``squared_l2`` mode (see
experiments/bench_memory.py, ``--scann_distance``). The memory re-ranks the returned ids by
directly computed Euclidean distance, so distances are exact.

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
with a NaN score, repeated). Such rows, and any with duplicate or out-of-range ids, are answered
by exact search over the indexed keys instead (an :class:`ExactIndex` built on first need), so a
search always returns k distinct real neighbours; searching more leaves avoids that cost.

Limit (rounding): ScaNN scores every mode, brute force included, by the float32 expansion above
and has no error certificate, so where the keys' distance from their mean R is large next to the
gaps between near neighbours (roughly R^2 d 2^-24 above their squared gap) it returns wrong
neighbours, and ``reorder`` cannot help (it re-scores with the same expansion). Two clusters at
+-S, spread 0.01, d = 8: recall@10 0.996 at S = 1, 0.72 at S = 10, 0.01 at S = 1000
(tests/test_memory_scann_limits.py). ``exact`` and ``approx`` certify their candidates and stay
exact there: use them for such keys.

Memory editing: keys added after the build go to a side buffer (an :class:`ExactIndex`) searched
exactly beside ScaNN, so they are neighbours at once and never missed; the ScaNN index is rebuilt
over everything only when the buffer outgrows ``max(1024, indexed / 10)`` keys (a rebuild of 1M
keys costs about a minute, searching a small buffer exactly costs little). Options given at build
time or set as query settings carry over to the rebuild; the rest are derived again from the new n.
"""
from __future__ import annotations

import math
import os

import numpy as np

from resmem_jax import quiet
from resmem_jax.memory import index as index_lib
from resmem_jax.memory import scaling
from resmem_jax.memory.exact import ExactIndex

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


def _transform_keys(keys: np.ndarray, center: np.ndarray, distance: str):
  """``(ScaNN's database, the keys' scale exponent)``."""
  centred = keys - center
  exponent = scaling.key_exponent(centred)
  centred = scaling.scaled(centred, exponent)
  if distance == "squared_l2":
    return centred, exponent
  half_norm = -0.5 * np.einsum("nd,nd->n", centred, centred)
  return np.concatenate([centred, half_norm[:, None]], axis=1).astype(np.float32), exponent


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


def _build_searcher(keys: np.ndarray, center: np.ndarray, opts: dict):
  """``(ScaNN searcher, the keys' scale exponent)``."""
  scann = _import_scann()
  size = keys.shape[0]
  db, exponent = _transform_keys(keys, center, opts["distance"])
  measure = "dot_product" if opts["distance"] == "mips_l2" else "squared_l2"
  # num_neighbors is only the default; every search passes its own count.
  builder = scann.builder(db, 10, measure)
  if opts.get("num_threads"):
    builder = builder.set_n_training_threads(int(opts["num_threads"]))
  if opts["mode"] == "brute_force":
    with quiet.hidden_output():
      return builder.score_brute_force().build(), exponent
  if opts["mode"] == "tree_ah":
    num_leaves = _tree_leaves(size, opts)
    builder = builder.tree(num_leaves=num_leaves,
                           num_leaves_to_search=min(int(opts["leaves_to_search"]), num_leaves),
                           training_sample_size=min(size, int(opts["training_sample_size"])))
  threshold = float(opts["quantization_threshold"]) if measure == "dot_product" else float("nan")
  builder = builder.score_ah(int(opts["dims_per_block"]), anisotropic_quantization_threshold=threshold,
                             training_sample_size=min(size, int(opts["training_sample_size"])))
  if opts["reorder"]:
    builder = builder.reorder(int(opts["reorder"]))
  with quiet.hidden_output():
    return builder.build(), exponent


def _check_integer_range(name: str, value: int) -> None:
  if name == "num_threads" and value > MAX_THREADS:
    raise ValueError(f"scann option num_threads must be at most {MAX_THREADS} (ScaNN starts that "
                     f"many threads; this host has {os.cpu_count()} cores), got {value}")
  if value > INT32_MAX:
    raise ValueError(f"scann option {name} must be at most 2**31 - 1 (ScaNN counts in int32), "
                     f"got {value}")


class ScannIndex(index_lib.SearchIndex):
  """A ScaNN searcher over the first ``indexed`` keys, and an exact buffer over the rest.

  ``requested`` holds the options given at build time plus query settings set since (kept by a
  rebuild); ``options`` is them resolved against the defaults for ``indexed`` keys. ``keys`` are
  the indexed keys (a view of the memory's), for the exact answers to rows ScaNN leaves short.
  """

  OPTION_NAMES = OPTION_NAMES
  REQUIRES = ("scann", "scann")
  INFO_NAMES = ("indexed", "center", "scale_exponent", "requested", "options")

  def __init__(self, searcher, keys: np.ndarray, center: np.ndarray, exponent: int,
               requested: dict, options: dict, buffer: ExactIndex | None = None,
               exact: ExactIndex | None = None):
    self.searcher = searcher
    self.keys = keys
    self.indexed = keys.shape[0]
    self.center = center
    self.exponent = int(exponent)
    self.requested = requested
    self.options = options
    self.buffer = buffer
    # Exact search over the indexed keys, built the first time ScaNN leaves a row short.
    self._exact = exact
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
  def build(cls, keys: np.ndarray, options: dict) -> ScannIndex:
    requested = cls.check_options(options)
    check_size(keys.shape[0], requested)
    resolved = _resolve(keys.shape[0], requested)
    center = scaling.center(keys)
    searcher, exponent = _build_searcher(keys, center, resolved)
    return cls(searcher, keys, center, exponent, requested, resolved)

  def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
    """ScaNN's ids for the indexed keys, then the buffer's (exact, with spare candidates)."""
    ids = self._scann_candidates(queries, min(k, self.indexed))
    if self.buffer is not None:
      extra = self.buffer.candidates(queries, k)
      ids = np.concatenate([ids, np.where(extra >= 0, extra + self.indexed, -1)], axis=1)
    return ids

  def _scann_candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
    """``[q, >= k]`` distinct ids in ``[0, indexed)`` (-1 beyond the first k)."""
    if queries.shape[0] == 0:  # ScaNN rejects an empty batch with a misleading shape error
      return np.zeros((0, k), np.int32)
    opts = self.options
    # ``reorder`` is the depth for k = 10; a deeper k needs more re-scored candidates (100k x 128,
    # reorder 150: recall@32 0.974, recall@128 0.781; 128 needs about 400 for 0.99).
    # Re-scoring more candidates than there are keys changes nothing (and could overflow int32).
    pre = min(max(int(opts.get("reorder") or 0) + 3 * max(0, k - 10), k), max(k, self.indexed))
    kwargs = {"final_num_neighbors": k}
    if opts["mode"] != "brute_force" and opts.get("reorder"):
      kwargs["pre_reorder_num_neighbors"] = pre
    if opts["mode"] == "tree_ah":
      kwargs["leaves_to_search"] = int(opts["leaves_to_search"])
    transformed, exact_rows = _transform_queries(queries, self.center, self.exponent,
                                                 opts["distance"])
    if len(queries) >= 256:
      ids, scores = self.searcher.search_batched_parallel(transformed, **kwargs)
    else:
      ids, scores = self.searcher.search_batched(transformed, **kwargs)
    ids = np.asarray(ids, np.int64)
    # ScaNN pads a short answer with id 0 at a NaN score.
    real = np.isfinite(np.asarray(scores)) & (ids >= 0) & (ids < self.indexed)
    ids = np.where(real, ids, -1)
    ordered = np.sort(ids, axis=1)
    repeated = np.any((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0), axis=1)
    exact_rows |= repeated | (real.sum(axis=1) < k)
    if not exact_rows.any():
      return ids.astype(np.int32)
    if self._exact is None:
      self._exact = ExactIndex.build(self.keys, {})
    exact = self._exact.candidates(queries[exact_rows], k)
    out = np.full((len(queries), max(ids.shape[1], exact.shape[1])), -1, np.int32)
    out[:, :ids.shape[1]] = ids
    out[exact_rows] = -1
    out[exact_rows, :exact.shape[1]] = exact
    return out

  def extend(self, keys: np.ndarray) -> ScannIndex:
    added = keys.shape[0] - self.indexed
    if added > max(1024, self.indexed // 10):
      return ScannIndex.build(keys, self.requested)
    # The searcher is shared, never mutated: this index and the new one both stay valid.
    buffer: ExactIndex | None
    if self.buffer is not None:
      buffer = self.buffer.extend(keys[self.indexed:])
    else:
      buffer = ExactIndex.build(keys[self.indexed:], {}) if added else None
    return ScannIndex(self.searcher, keys[:self.indexed], self.center, self.exponent,
                      dict(self.requested), dict(self.options), buffer, self._exact)

  def save(self, directory: str) -> dict:
    self.searcher.serialize(directory, relative_path=True)
    # The buffer is not saved: it is rebuilt from the memory's keys after the first `indexed`.
    return {"indexed": self.indexed, "center": self.center.tolist(),
            "scale_exponent": self.exponent, "requested": dict(self.requested),
            "options": dict(self.options)}

  @classmethod
  def load(cls, directory: str, keys: np.ndarray, info: dict) -> ScannIndex:
    n = keys.shape[0]
    index_lib.check_option_names("scann index info", info, cls.INFO_NAMES)
    missing = [name for name in cls.INFO_NAMES if name not in info]
    if missing:
      raise ValueError(f"scann index info lacks {missing}")
    indexed, exponent = info["indexed"], info["scale_exponent"]
    for name, value in (("indexed", indexed), ("scale_exponent", exponent)):
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"scann index info {name} must be an integer, got {value!r}")
    if not 0 < indexed <= n:
      raise ValueError(f"scann indexed count {indexed} is not in [1, {n}]")
    center = np.asarray(info["center"], np.float32)
    if center.shape != (keys.shape[1],):
      raise ValueError(f"scann center has shape {center.shape}, the keys have dimension "
                       f"{keys.shape[1]}")
    if not np.all(np.isfinite(center)):
      raise ValueError("scann center holds NaN or inf")
    if not (isinstance(info["requested"], dict) and isinstance(info["options"], dict)):
      raise ValueError("scann index info requested and options must be dicts")
    requested = cls.check_options(info["requested"])
    options = _resolve(indexed, cls.check_options(info["options"]))
    # load_searcher writes a scann_assets.pbtxt of its own into a folder lacking one.
    if not os.path.isfile(os.path.join(directory, "scann_assets.pbtxt")):
      raise ValueError(f"{directory} holds no ScaNN index (scann_assets.pbtxt is missing)")
    try:
      scann = _import_scann()
      with quiet.hidden_output():
        searcher = scann.load_searcher(directory)
    except RuntimeError as err:
      raise ValueError(f"ScaNN cannot load the index in {directory}: {err}") from None
    if searcher.size() != indexed:
      raise ValueError(f"scann index in {directory} holds {searcher.size()} points but the "
                       f"manifest says {indexed}")
    buffer = ExactIndex.build(keys[indexed:], {}) if indexed < n else None
    return cls(searcher, keys[:indexed], center, exponent, requested, options, buffer)

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
