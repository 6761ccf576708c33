"""Choosing ScaNN's query-time settings on the queries a memory will actually see.

The defaults in :mod:`resmem_jax.memory.scann_index` were measured on clustered synthetic points;
real embeddings differ (the 32-d ReLU embeddings of an MNIST CNN needed three times the leaves
searched for the same recall). ``leaves_to_search`` and ``reorder`` act at query time, so they can
be swept on a sample of real queries without rebuilding the index: each setting is scored by
recall@k against exact search over the same keys and by its query time, and the fastest setting
that reaches the target recall is kept.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

LEAVES_GRID = (2, 4, 8, 12, 16, 24, 32, 48, 64, 96)
REORDER_GRID = (25, 50, 100, 150, 200, 300, 400, 600, 800)


@dataclasses.dataclass
class SearchSetting:
  leaves_to_search: int | None  # None: the index has no tree
  reorder: int
  recall: float
  seconds: float  # fastest of the timed calls, for all tuning queries


def recall_at_k(found: np.ndarray, reference: np.ndarray) -> float:
  """Mean over queries of |found ∩ reference| / k (ids; -1 never matches a real id)."""
  k = reference.shape[1]
  hits = sum(len(np.intersect1d(a, b)) for a, b in zip(found, reference))
  return float(hits / (k * len(reference)))


def best_of(fn, repeats: int):
  """``fn()``'s result and the fastest wall time of ``repeats`` calls (the least disturbed by
  other load)."""
  best, out = None, None
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    best = seconds if best is None else min(best, seconds)
  return out, best


def tune_search(memory, queries, k: int, target_recall: float = 0.99, *,
                leaves_grid=LEAVES_GRID, reorder_grid=REORDER_GRID, repeats: int = 2,
                max_queries: int = 2000) -> dict:
  """Sets the fastest (leaves_to_search, reorder) whose recall@k on ``queries`` >= target.

  ``memory`` must use the ``scann`` backend in ``tree_ah`` or ``ah`` mode (brute force has nothing
  to tune). Returns ``{"leaves_to_search", "reorder", "recall", "queries_per_second",
  "exact_queries_per_second", "met_target", "num_queries", "tried"}``; when no setting reaches
  the target, the one with the highest recall is kept and ``met_target`` is False. The choice
  also applies to later rebuilds (after :meth:`Memory.add`) and is saved with the memory. At most
  ``max_queries`` evenly spaced queries are used: the exact reference search over a large memory
  is the expensive part.
  """
  if memory.backend != "scann":
    raise ValueError(f"tune_search needs the scann backend, this memory uses {memory.backend!r}")
  options = memory._scann.options  # pylint: disable=protected-access
  if options["mode"] == "brute_force":
    raise ValueError("this scann memory searches by brute force (exact); build it with "
                     "mode='tree_ah' or mode='ah' to have settings to tune")
  if not 0 < float(target_recall) <= 1:
    raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
  queries = memory._check_queries(queries)  # pylint: disable=protected-access
  if queries.shape[0] == 0:
    raise ValueError("queries is empty (0 rows); tuning needs real queries")
  k = memory._check_k(k)  # pylint: disable=protected-access
  if queries.shape[0] > max_queries:
    queries = queries[np.linspace(0, queries.shape[0] - 1, max_queries).astype(np.int64)]
  from resmem_jax.memory.exact import ExactIndex  # pylint: disable=g-import-not-at-top
  exact = ExactIndex(memory.keys)
  exact.search(queries[:8], k)  # compile outside the timing
  (_, reference), exact_seconds = best_of(lambda: exact.search(queries, k), repeats)

  if options["mode"] == "tree_ah":
    num_leaves = int(options["num_leaves"])
    leaves = sorted({min(int(v), num_leaves) for v in leaves_grid})
  else:
    leaves = [None]
  saved = {"leaves_to_search": options.get("leaves_to_search"), "reorder": options.get("reorder")}
  tried = []
  try:
    for leaf_count in leaves:
      for reorder in sorted(int(r) for r in reorder_grid):
        if leaf_count is not None:
          options["leaves_to_search"] = leaf_count
        options["reorder"] = reorder
        memory.search(queries[:8], k)
        (_, found), seconds = best_of(lambda: memory.search(queries, k), repeats)
        setting = SearchSetting(leaf_count, reorder, recall_at_k(found, reference), seconds)
        tried.append(setting)
        if setting.recall >= target_recall:
          break  # deeper re-scoring at this leaf count only costs more time
  finally:
    options.update(saved)

  reaching = [s for s in tried if s.recall >= target_recall]
  best = (min(reaching, key=lambda s: s.seconds) if reaching
          else max(tried, key=lambda s: (s.recall, -s.seconds)))
  chosen = {"reorder": best.reorder}
  if best.leaves_to_search is not None:
    chosen["leaves_to_search"] = best.leaves_to_search
  options.update(chosen)
  memory.backend_options.update(chosen)  # rebuilds after add() keep the tuned settings
  return {"leaves_to_search": best.leaves_to_search, "reorder": best.reorder,
          "recall": best.recall, "queries_per_second": len(queries) / best.seconds,
          "exact_queries_per_second": len(queries) / exact_seconds,
          "met_target": bool(reaching), "num_queries": int(len(queries)),
          "tried": [dataclasses.asdict(s) for s in tried]}
