"""Benchmarks the ResMem memory backends and residual formats.

    python -m experiments.bench_memory                       # the full run (100k x 128, 1M x 64)
    python -m experiments.bench_memory --sizes=20000x64 --num_queries=1000   # quick

At scale, built from shards on disk (resmem_jax/bench/memory_scale.py: each method in its own
process, peak RSS measured, beside faiss IVFPQ (kNN-LM's 64-byte codes, with and without its
float16 re-rank) and HNSW on the same rows):
    python -m experiments.bench_memory --build_from=shards --sizes=10000000x128 --out=/tmp/b.json
"""
from resmem_jax.cli import flags as cli_flags  # first: quiets TensorFlow before it loads

from absl import flags

from resmem_jax.bench import memory_scale
from resmem_jax.bench import memory_search
from resmem_jax.memory import parse_backend_options

_SIZES = flags.DEFINE_list("sizes", ["100000x128", "1000000x64"], "Memory sizes as NxD.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 10000, "Queries per size.")
_K = flags.DEFINE_integer("k", 10, "Neighbours per query (recall@k).")
_SCANN_DISTANCE = flags.DEFINE_enum("scann_distance", "mips_l2", ["mips_l2", "squared_l2"],
                                    "ScaNN scoring: L2 via a MIPS reduction, or squared_l2.")
_SCANN_REORDER = flags.DEFINE_integer("scann_reorder", None, "Override ScaNN's reorder depth.")
_SCANN_LEAVES = flags.DEFINE_integer("scann_leaves_to_search", None, "Override leaves searched.")
_HNSW_EF = flags.DEFINE_list("hnsw_ef", ["16", "32", "64", "128", "256"], "faiss HNSW efSearch values.")
_FAISS = flags.DEFINE_bool("faiss", True, "Also run the faiss-cpu peers when installed.")
_CLASSES = flags.DEFINE_list("classes", ["100", "1000"], "Class counts for the storage table.")
_TOP_M = flags.DEFINE_integer("top_m", 16, "m of the sparse residual format.")
_TUNE_RECALL = flags.DEFINE_float(
    "tune_recall", None, "Also report scann after Memory.tune_search to this recall@k, tuned on "
    "1,000 extra queries (this changes the query sample, so compare rows within one run).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed query calls per index; the fastest is reported.")
_BUILD_FROM = flags.DEFINE_enum(
    "build_from", "arrays", ["arrays", "shards"], "arrays: points in RAM (the table above); "
    "shards: rows written to --shard_dir shard by shard, memories built from the shards, each "
    "method in its own process (resmem_jax/bench/memory_scale.py). --num_queries defaults to "
    "2000 there.")
_SHARD_DIR = flags.DEFINE_string("shard_dir", "/tmp/resmem_bench_shards",
                                 "shards mode: where the rows, queries and reference top-k live "
                                 "(a subfolder per data setting; reused by later runs).")
_KEY_FORMATS = flags.DEFINE_list("key_formats", ["float32", "bfloat16", "float16", "int8"],
                                 "shards mode: the memory's key formats, one scann memory each.")
_FAISS_PEERS = flags.DEFINE_list("faiss_peers", ["ivfpq", "ivfpq_rerank", "hnsw"],
                                 "shards mode: faiss peers on the same rows.")
_HNSW_BUDGET = flags.DEFINE_float("hnsw_budget_s", 1200.0,
                                  "shards mode: HNSW build time budget; past it the index keeps "
                                  "the prefix built so far and its rows say so.")
_CLUSTERS = flags.DEFINE_integer("clusters", 1000, "shards mode: cluster centres of the rows.")
_SHARD_ROWS = flags.DEFINE_integer("shard_rows", 500_000, "shards mode: rows per shard.")
_RESIDUAL_FORMAT = flags.DEFINE_string("residual_format", "sparse_float16",
                                       "shards mode: the memories' residual format.")
_SCANN_OPTIONS = flags.DEFINE_string("scann_options", "", "shards mode: scann backend options "
                                     "'key=value,...' (default: the backend's for n).")
_SCANN_LEAVES_SWEEP = flags.DEFINE_list("scann_leaves_sweep", [], "shards mode: leaves_to_search "
                                        "values (default: 1/4, 1/2, 1 and 2 x the default).")
_SCANN_REORDERS = flags.DEFINE_list("scann_reorders", ["100", "200", "400"],
                                    "shards mode: reorder depths swept.")
_NLIST = flags.DEFINE_integer("ivf_nlist", 0, "shards mode: IVFPQ lists (0: the power of two "
                              "nearest 2 sqrt(n), 8192 at 10M).")
_PQ_BYTES = flags.DEFINE_integer("pq_bytes", 64, "shards mode: IVFPQ code bytes (kNN-LM: 64).")
_TRAIN_ROWS = flags.DEFINE_integer("ivf_train_rows", 250_000, "shards mode: IVFPQ training sample.")
_HNSW_M = flags.DEFINE_integer("hnsw_m", 32, "shards mode: HNSW links per node.")
_NPROBES = flags.DEFINE_list("nprobes", ["8", "16", "32", "64"], "shards mode: IVFPQ nprobe sweep.")
_RERANK = flags.DEFINE_list("rerank_depths", ["100", "400"],
                            "shards mode: IVFPQ candidates re-scored from float16 keys.")
_THREADS = flags.DEFINE_integer("threads", 2, "shards mode: faiss OpenMP threads.")
_OUT = flags.DEFINE_string("out", None, "shards mode: JSON report path (rewritten per method).")


def main(argv):
  del argv
  if _BUILD_FROM.value == "shards":
    _run_shards()
    return
  sizes = [tuple(int(v) for v in s.lower().split("x")) for s in _SIZES.value]
  scann_options = {"distance": _SCANN_DISTANCE.value}
  if _SCANN_REORDER.value is not None:
    scann_options["reorder"] = _SCANN_REORDER.value
  if _SCANN_LEAVES.value is not None:
    scann_options["leaves_to_search"] = _SCANN_LEAVES.value
  memory_search.main(sizes, _NUM_QUERIES.value, _K.value, scann_options,
                     [int(e) for e in _HNSW_EF.value], _FAISS.value, [int(c) for c in _CLASSES.value],
                     _TOP_M.value, _REPEATS.value, _TUNE_RECALL.value)


def _run_shards():
  for size in _SIZES.value:
    n, d = (int(v) for v in size.lower().split("x"))
    memory_scale.run(
        n, d, shard_dir=_SHARD_DIR.value,
        num_queries=_NUM_QUERIES.value if _NUM_QUERIES.present else 2000, k=_K.value,
        key_formats=_KEY_FORMATS.value, peers=_FAISS_PEERS.value, num_clusters=_CLUSTERS.value,
        shard_rows=_SHARD_ROWS.value, residual_format=_RESIDUAL_FORMAT.value,
        scann_options=parse_backend_options(_SCANN_OPTIONS.value),
        scann_leaves=[int(v) for v in _SCANN_LEAVES_SWEEP.value],
        scann_reorders=[int(v) for v in _SCANN_REORDERS.value], nlist=_NLIST.value,
        pq_bytes=_PQ_BYTES.value, train_rows=_TRAIN_ROWS.value, hnsw_m=_HNSW_M.value,
        nprobes=[int(v) for v in _NPROBES.value], rerank_depths=[int(v) for v in _RERANK.value],
        hnsw_ef=[int(e) for e in _HNSW_EF.value], hnsw_budget_s=_HNSW_BUDGET.value,
        threads=_THREADS.value, repeats=_REPEATS.value,
        out=_OUT.value if len(_SIZES.value) == 1 else _OUT.value and f"{_OUT.value}.{size}")


if __name__ == "__main__":
  cli_flags.run(main)
