"""Choosing an index's query-time settings on the queries a memory will actually see.

The ScaNN defaults in :mod:`resmem_jax.memory.scann` were measured on clustered synthetic points;
real embeddings differ (the 32-d ReLU embeddings of an MNIST CNN needed three times the leaves
searched for the same recall). Query-time settings (ScaNN's ``leaves_to_search`` and ``reorder``)
can be swept on a sample of real queries without rebuilding the index: each setting is scored by
recall@k against exact search over the same keys and by its query time, and the fastest setting
that reaches the target recall is kept. The settings and their order come from the index
(:meth:`~resmem_jax.memory.index.SearchIndex.query_settings_grid`).
"""
from __future__ import annotations

import time

import numpy as np

from resmem_jax.memory import checks
from resmem_jax.memory.exact import ExactIndex, rerank_exact
from resmem_jax.memory.keys import KeyStore


def recall_at_k(found: np.ndarray, reference: np.ndarray) -> float:
  """Mean over queries of |found ∩ reference| / k (ids; -1 never matches a real id)."""
  k = reference.shape[1]
  hits = sum(len(np.intersect1d(a, b)) for a, b in zip(found, reference, strict=True))
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


def tune_search(memory, queries, k: int, target_recall: float = 0.99, *, repeats: int = 2,
                max_queries: int = 2000, **grids) -> dict:
  """Sets the fastest query settings whose recall@k on ``queries`` >= ``target_recall``.

  ``memory``'s index must have query settings (``scann`` in ``tree_ah`` or ``ah`` mode: brute
  force has nothing to tune). ``grids`` override the index's value lists (scann:
  ``leaves_grid``, ``reorder_grid``). Returns the chosen settings (scann: ``leaves_to_search``,
  None without a tree, and ``reorder``) with ``"recall", "queries_per_second",
  "exact_queries_per_second", "met_target", "num_queries", "tried"``; when no setting reaches the
  target, the one with the highest recall is kept and ``met_target`` is False. The index keeps
  the choice for later rebuilds (after :meth:`Memory.add`) and saves it with the memory. At most
  ``max_queries`` evenly spaced queries are used: the exact reference search over a large memory
  is the expensive part.
  """
  index = memory.index
  sweeps = index.query_settings_grid(**grids)
  if not any(sweeps):
    raise ValueError(f"the query settings grid is empty ({grids}); give at least one value each")
  if not 0 < float(target_recall) <= 1:
    raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
  queries = checks.queries(queries, memory.dim)
  if queries.shape[0] == 0:
    raise ValueError("queries is empty (0 rows); tuning needs real queries")
  k = checks.neighbour_count(k, memory.size)
  if queries.shape[0] > max_queries:
    queries = queries[np.linspace(0, queries.shape[0] - 1, max_queries).astype(np.int64)]
  keys = memory.keys
  exact = ExactIndex.build(KeyStore("float32", keys), {})

  def exact_search(q):
    return rerank_exact(q, keys, exact.candidates(q, k), k)

  exact_search(queries[:8])  # compile outside the timing
  (_, reference), exact_seconds = best_of(lambda: exact_search(queries), repeats)

  saved = index.query_settings()
  tried = []
  try:
    for sweep in sweeps:
      for setting in sweep:
        index.set_query_settings(**setting)
        memory.search(queries[:8], k)
        (_, found), seconds = best_of(lambda: memory.search(queries, k), repeats)
        recall = recall_at_k(found, reference)
        tried.append({**index.query_settings(), "recall": recall, "seconds": seconds})
        if recall >= target_recall:
          break  # the rest of this sweep only costs more time
  finally:
    index.set_query_settings(**saved)

  reaching = [t for t in tried if t["recall"] >= target_recall]
  best = (min(reaching, key=lambda t: t["seconds"]) if reaching
          else max(tried, key=lambda t: (t["recall"], -t["seconds"])))
  chosen = {name: best[name] for name in saved}
  index.set_query_settings(**chosen)
  return {**chosen, "recall": best["recall"], "queries_per_second": len(queries) / best["seconds"],
          "exact_queries_per_second": len(queries) / exact_seconds,
          "met_target": bool(reaching), "num_queries": int(len(queries)), "tried": tried}
