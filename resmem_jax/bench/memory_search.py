"""Nearest-neighbour benchmark behind experiments/bench_memory.py.

For each (n, d): clustered points (:mod:`resmem_jax.bench.synthetic`) and independent queries;
reports build seconds, queries per second (one batched call over all queries, the fastest of
``repeats`` calls, after a warm-up call on a few queries so JIT compilation is excluded) and
recall@k against the ``exact`` backend, for ``exact``, ``scann`` (and, with ``tune_recall``,
scann after :func:`~resmem_jax.memory.tuning.tune_search` on held-out queries) and, when
importable, faiss ``IndexFlatL2`` and ``IndexHNSWFlat`` (an efSearch sweep). Then the bytes per
stored example of each residual format.
"""
from __future__ import annotations

import numpy as np

from resmem_jax.bench.synthetic import clustered_points
from resmem_jax.core.residuals import residuals as make_residuals
from resmem_jax.memory import build_memory
from resmem_jax.memory.tuning import best_of, recall_at_k


def _row(name, size, dim, build_s, search_s, num_queries, recall):
  print(f"{name:<28} {size:>9} {dim:>4} {build_s:>9.2f} {num_queries / search_s:>11.0f} {recall:>9.4f}",
        flush=True)


def run_search_benchmark(size, dim, num_queries, k, scann_options, hnsw_ef, with_faiss, seed=0,
                         repeats=2, tune_recall=None, tune_queries=1000):
  extra = tune_queries if tune_recall else 0
  keys, queries = clustered_points(size, dim, num_queries=num_queries + extra, seed=seed)
  # Tuning queries come from the same distribution but are never the timed / scored ones.
  queries, held_out = queries[:num_queries], queries[num_queries:]
  residuals = np.zeros((size, 1), np.float32)  # search cost does not depend on residuals

  memory, build_s = best_of(lambda: build_memory(keys, residuals, backend="exact"), 1)
  memory.search(queries[:8], k)
  (_, reference), search_s = best_of(lambda m=memory: m.search(queries, k), repeats)
  _row("exact (jax)", size, dim, build_s, search_s, num_queries, 1.0)
  del memory

  memory, build_s = best_of(
      lambda: build_memory(keys, residuals, backend="scann", **scann_options), 1)
  memory.search(queries[:8], k)
  (_, found), search_s = best_of(lambda m=memory: m.search(queries, k), repeats)
  _row("scann " + memory.backend_options["mode"], size, dim, build_s, search_s, num_queries,
       recall_at_k(found, reference))
  print(f"  scann options: {memory.backend_options}", flush=True)
  if tune_recall and memory.backend_options["mode"] != "brute_force":
    tuned = memory.tune_search(held_out, k, tune_recall)
    memory.search(queries[:8], k)
    (_, found), search_s = best_of(lambda m=memory: m.search(queries, k), repeats)
    _row(f"scann tuned (target {tune_recall})", size, dim, build_s, search_s, num_queries,
         recall_at_k(found, reference))
    print(f"  tuned on {len(held_out)} other queries: leaves_to_search "
          f"{tuned['leaves_to_search']}, reorder {tuned['reorder']}", flush=True)
  del memory

  if not with_faiss:
    return
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("faiss not installed: peer rows skipped")
    return
  index, build_s = best_of(lambda: _faiss_add(faiss.IndexFlatL2(dim), keys), 1)
  (_, found), search_s = best_of(lambda: index.search(queries, k), repeats)
  _row("faiss IndexFlatL2", size, dim, build_s, search_s, num_queries, recall_at_k(found, reference))
  # The exact/faiss ratio moves with the threads each gets and faiss's SIMD build: say which.
  print(f"  faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, "
        f"{faiss.get_compile_options()}", flush=True)
  del index
  index, build_s = best_of(lambda: _faiss_add(faiss.IndexHNSWFlat(dim, 32), keys), 1)
  for ef in hnsw_ef:
    index.hnsw.efSearch = int(ef)
    (_, found), search_s = best_of(lambda: index.search(queries, k), repeats)
    _row(f"faiss HNSWFlat M=32 ef={ef}", size, dim, build_s, search_s, num_queries,
         recall_at_k(found, reference))


def _faiss_add(index, keys):
  index.add(keys)
  return index


def run_storage_benchmark(class_counts, top_m, dim=64, size=2000, seed=0):
  """Bytes per example (keys, residuals) for each format, on softmax residuals of random logits."""
  rng = np.random.default_rng(seed)
  keys = rng.normal(size=(size, dim)).astype(np.float32)
  print(f"\n{'classes':>7} {'format':<10} {'key B d=' + str(dim):>10} {'residual B':>11} {'max |err|':>10}")
  for num_classes in class_counts:
    logits = 3.0 * rng.normal(size=(size, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=size)
    residuals = make_residuals(labels, logits, 1.0)
    for fmt in ("dense", "bfloat16", "sparse"):
      memory = build_memory(keys, residuals, residual_format=fmt, top_m=top_m)
      stored = memory.bytes_per_example()
      err = np.abs(memory.gather_residuals(np.arange(size)) - residuals).max()
      name = f"sparse m={top_m}" if fmt == "sparse" else fmt
      print(f"{num_classes:>7} {name:<10} {stored['keys']:>10.0f} {stored['residuals']:>11.0f} {err:>10.2e}")


def main(sizes, num_queries, k, scann_options, hnsw_ef, with_faiss, class_counts, top_m, repeats=2,
         tune_recall=None):
  print(f"{'index':<28} {'n':>9} {'d':>4} {'build s':>9} {'queries/s':>11} {'recall@' + str(k):>9}")
  for size, dim in sizes:
    run_search_benchmark(size, dim, num_queries, k, scann_options, hnsw_ef, with_faiss,
                         repeats=repeats, tune_recall=tune_recall)
  run_storage_benchmark(class_counts, top_m)
