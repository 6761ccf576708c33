"""Approximate nearest-neighbour search with ScaNN, returning exact Euclidean distances.

Euclidean search is reduced to maximum inner product search (MIPS): after centring the keys
(L2 distance is translation invariant, and centring keeps the extra coordinate small),
``|q - k|^2 = |q|^2 - 2 (q.k - |k|^2 / 2)``, so with ``k' = [k, -|k|^2 / 2]`` and ``q' = [q, 1]``
the nearest key is the one with the largest ``q'.k'``. ScaNN's anisotropic quantization is built
for inner products; on clustered 1M x 64 data it gave much higher recall this way than ScaNN's
``squared_l2`` mode (see experiments/bench_memory.py, ``--scann_distance``). ``Memory.search``
re-ranks the returned ids by directly computed Euclidean distance, so distances are exact.

Parameters follow ScaNN's published guidance, from the number of keys ``n``:
  n < 100k: brute force; otherwise: tree partitioning (about sqrt(n) leaves) + AH + exact
  reorder. ScaNN's own guidance switches to AH at about 20k; on real ReLU embeddings of MNIST MLPs
  (55k keys) AH + reorder 300 reached only recall@10 0.73 / 0.98 / 0.98 at d = 8 / 64 / 256 while
  brute force was exact *and* faster (80k / 20k / 2.8k queries/s vs 45k / 13k / 2.0k), so brute
  force is kept up to 100k. ``mode="ah"`` remains available as an option.
Recall is governed by ``leaves_to_search`` and ``reorder`` (re-scored candidates, stated for
k = 10; deeper k re-scores ``3 (k - 10)`` more); every parameter can be overridden through
``build_memory(..., backend="scann", **options)``. Real embeddings can need other settings than
the clustered benchmark data: ``experiments/configs/mnist.py:serving`` carries a tuned set.
"""
from __future__ import annotations

import math
import os

import numpy as np


OPTION_NAMES = ("mode", "distance", "num_leaves", "leaves_to_search", "reorder",
                "dims_per_block", "quantization_threshold", "training_sample_size",
                "num_threads")


BRUTE_FORCE_BELOW = 100_000


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


def _import_scann():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  return scann_ops_pybind


class ScannIndex:
  """A ScaNN searcher over ``keys`` (float32 ``[n, d]``) with exact re-ranking."""

  def __init__(self, keys: np.ndarray, options: dict | None = None, searcher=None,
               center: np.ndarray | None = None):
    unknown = sorted(set(options or {}) - set(OPTION_NAMES))
    if unknown:
      raise ValueError(f"unknown scann options {unknown}; valid options are {list(OPTION_NAMES)}")
    merged = default_options(keys.shape[0], (options or {}).get("mode"))
    merged.update(options or {})
    if merged["mode"] not in ("brute_force", "ah", "tree_ah"):
      raise ValueError(f"scann option mode must be brute_force, ah or tree_ah, got {merged['mode']!r}")
    if merged["distance"] not in ("mips_l2", "squared_l2"):
      raise ValueError(f"scann option distance must be mips_l2 or squared_l2, got {merged['distance']!r}")
    self.options = merged
    self.keys = keys
    self.size = keys.shape[0]
    self.center = keys.mean(axis=0) if center is None else center
    self.searcher = searcher if searcher is not None else self._build()

  def _transform_keys(self, keys):
    centred = (keys - self.center).astype(np.float32)
    if self.options["distance"] == "squared_l2":
      return centred
    half_norm = -0.5 * np.einsum("nd,nd->n", centred, centred)
    return np.concatenate([centred, half_norm[:, None]], axis=1).astype(np.float32)

  def _transform_queries(self, queries):
    centred = (queries - self.center).astype(np.float32)
    if self.options["distance"] == "squared_l2":
      return centred
    return np.concatenate([centred, np.ones((len(queries), 1), np.float32)], axis=1)

  def _build(self):
    scann = _import_scann()
    opts = self.options
    db = self._transform_keys(self.keys)
    measure = "dot_product" if opts["distance"] == "mips_l2" else "squared_l2"
    # num_neighbors is only the default; every search passes its own count.
    builder = scann.builder(db, 10, measure)
    if opts.get("num_threads"):
      builder = builder.set_n_training_threads(int(opts["num_threads"]))
    if opts["mode"] == "brute_force":
      return builder.score_brute_force().build()
    if opts["mode"] == "tree_ah":
      num_leaves = min(int(opts["num_leaves"]), max(1, self.size // 50))
      builder = builder.tree(num_leaves=num_leaves,
                             num_leaves_to_search=min(int(opts["leaves_to_search"]), num_leaves),
                             training_sample_size=min(self.size, int(opts["training_sample_size"])))
    threshold = float(opts["quantization_threshold"]) if measure == "dot_product" else float("nan")
    builder = builder.score_ah(int(opts["dims_per_block"]), anisotropic_quantization_threshold=threshold,
                               training_sample_size=min(self.size, int(opts["training_sample_size"])))
    if opts["reorder"]:
      builder = builder.reorder(int(opts["reorder"]))
    return builder.build()

  def candidate_ids(self, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids ``[q, k]`` int32 of (approximately) the k nearest keys, -1 where none.

    Unranked by exact distance: the caller re-ranks once (``Memory.search``, with any keys
    added since the build), so the gather of candidate keys is paid a single time.
    """
    k = min(k, self.size)
    opts = self.options
    # ``reorder`` is the depth for k = 10; a deeper k needs more re-scored candidates (100k x 128,
    # reorder 150: recall@32 0.974, recall@128 0.781; 128 needs about 400 for 0.99).
    pre = max(int(opts.get("reorder") or 0) + 3 * max(0, k - 10), k)
    kwargs = {"final_num_neighbors": k}
    if opts["mode"] != "brute_force" and opts.get("reorder"):
      kwargs["pre_reorder_num_neighbors"] = pre
    if opts["mode"] == "tree_ah":
      kwargs["leaves_to_search"] = int(opts["leaves_to_search"])
    transformed = self._transform_queries(queries)
    if len(queries) >= 256:
      ids, _ = self.searcher.search_batched_parallel(transformed, **kwargs)
    else:
      ids, _ = self.searcher.search_batched(transformed, **kwargs)
    ids = np.asarray(ids, np.int64)
    return np.where((ids >= 0) & (ids < self.size), ids, -1).astype(np.int32)

  def serialize(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    self.searcher.serialize(directory, relative_path=True)

  @classmethod
  def load(cls, directory: str, keys: np.ndarray, options: dict, center: np.ndarray):
    scann = _import_scann()
    searcher = scann.load_searcher(directory)
    if searcher.size() != keys.shape[0]:
      raise ValueError(f"scann index in {directory} holds {searcher.size()} points but the "
                       f"manifest says {keys.shape[0]}")
    return cls(keys, options, searcher=searcher, center=center)
