"""Benchmarks the ResMem memory backends and residual formats.

    python -m experiments.bench_memory                       # the full run (100k x 128, 1M x 64)
    python -m experiments.bench_memory --sizes=20000x64 --num_queries=1000   # quick
"""
from resmem_jax.cli import flags as cli_flags  # first: quiets TensorFlow before it loads

from absl import flags

from resmem_jax.bench import memory_search

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


def main(argv):
  del argv
  sizes = [tuple(int(v) for v in s.lower().split("x")) for s in _SIZES.value]
  scann_options = {"distance": _SCANN_DISTANCE.value}
  if _SCANN_REORDER.value is not None:
    scann_options["reorder"] = _SCANN_REORDER.value
  if _SCANN_LEAVES.value is not None:
    scann_options["leaves_to_search"] = _SCANN_LEAVES.value
  memory_search.main(sizes, _NUM_QUERIES.value, _K.value, scann_options,
                     [int(e) for e in _HNSW_EF.value], _FAISS.value, [int(c) for c in _CLASSES.value],
                     _TOP_M.value, _REPEATS.value, _TUNE_RECALL.value)


if __name__ == "__main__":
  cli_flags.run(main)
