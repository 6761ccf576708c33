"""ScaNN recall against the exact backend on clustered points (correctness, not timing)."""
import numpy as np
import pytest

from resmem_jax.bench.synthetic import clustered_points
from resmem_jax.memory import build_memory, load_memory
from resmem_jax.memory.tuning import recall_at_k


def test_scann_recall_at_10_on_100k_clustered_points():
  keys, queries = clustered_points(100_000, 64, num_queries=1000, seed=3)
  residuals = np.zeros((len(keys), 1), np.float32)
  _, reference = build_memory(keys, residuals, backend="exact").search(queries, 10)
  memory = build_memory(keys, residuals, backend="scann")
  assert memory.backend_options["mode"] == "tree_ah"  # the partitioned path is what is tested
  distances, found = memory.search(queries, 10)
  # ScaNN's build is not deterministic: five builds of this index gave recall 0.989 to 0.995.
  assert recall_at_k(found, reference) >= 0.98
  assert np.all(np.diff(distances, axis=1) >= 0)
  # Returned distances are the true Euclidean distances of the returned ids.
  true = np.linalg.norm(keys[found] - queries[:, None, :], axis=-1)
  np.testing.assert_allclose(distances, true, rtol=1e-5, atol=1e-5)
  # A deeper k searches deeper (reorder grows with k), so recall holds at k = 100 too.
  _, reference = build_memory(keys, residuals, backend="exact").search(queries, 100)
  assert recall_at_k(memory.search(queries, 100)[1], reference) >= 0.98
  # Training points are found at distance exactly 0 (differences, not the norm expansion).
  distances, found = memory.search(keys[:200], 1)
  np.testing.assert_array_equal(distances[:, 0], 0.0)
  np.testing.assert_array_equal(found[:, 0], np.arange(200))


def test_scann_asymmetric_hashing_mode_when_asked():
  keys, queries = clustered_points(25_000, 16, num_queries=300, seed=4)
  residuals = np.zeros((len(keys), 1), np.float32)
  _, reference = build_memory(keys, residuals, backend="exact").search(queries, 10)
  assert build_memory(keys[:5000], residuals[:5000],
                                 backend="scann").backend_options["mode"] == "brute_force"
  memory = build_memory(keys, residuals, backend="scann", mode="ah", reorder=300,
                                   dims_per_block=1, quantization_threshold=0.2)
  assert memory.backend_options["mode"] == "ah"
  _, found = memory.search(queries, 10)
  assert recall_at_k(found, reference) >= 0.99
  # Without a tree only the reorder depth is tuned.
  report = memory.tune_search(queries[:100], 10, 0.95, reorder_grid=(50, 300), repeats=1)
  assert report["leaves_to_search"] is None and report["reorder"] in (50, 300)
  assert all(t["leaves_to_search"] is None for t in report["tried"])
  with pytest.raises(ValueError, match="needs mode tree_ah"):
    memory.index.set_query_settings(leaves_to_search=4)


def test_scann_squared_l2_override_and_bad_options():
  keys, queries = clustered_points(2_000, 8, num_queries=50, seed=5)
  residuals = np.zeros((len(keys), 1), np.float32)
  memory = build_memory(keys, residuals, backend="scann", distance="squared_l2")
  _, reference = build_memory(keys, residuals).search(queries, 5)
  np.testing.assert_array_equal(memory.search(queries, 5)[1], reference)  # brute force: exact
  with pytest.raises(ValueError, match="distance"):
    build_memory(keys, residuals, backend="scann", distance="cosine")
  with pytest.raises(ValueError, match="mode"):
    build_memory(keys, residuals, backend="scann", mode="lsh")


def test_tune_search_reaches_the_target_on_the_given_queries(tmp_path):
  keys, queries = clustered_points(20_000, 16, num_queries=600, seed=6)
  residuals = np.zeros((len(keys), 1), np.float32)
  memory = build_memory(keys, residuals, backend="scann", mode="tree_ah",
                        num_leaves=100, leaves_to_search=1, reorder=10)
  _, reference = build_memory(keys, residuals, backend="exact").search(queries, 10)
  before = recall_at_k(memory.search(queries, 10)[1], reference)
  report = memory.tune_search(queries[:300], 10, target_recall=0.98)
  assert report["met_target"] and report["recall"] >= 0.98
  assert memory.backend_options["leaves_to_search"] == report["leaves_to_search"]
  assert memory.backend_options["reorder"] == report["reorder"]
  # Held-out queries from the same distribution get the recall the tuning promised (nearly).
  after = recall_at_k(memory.search(queries[300:], 10)[1], reference[300:])
  assert before < 0.9 <= 0.96 <= after
  # The settings survive a save / load, and a rebuild after add() uses them.
  memory.save(tmp_path / "tuned")
  loaded = load_memory(tmp_path / "tuned")
  assert loaded.backend_options["reorder"] == report["reorder"]
  np.testing.assert_array_equal(loaded.search(queries[300:], 10)[1], memory.search(queries[300:], 10)[1])
  memory.add(keys[:1] + 1e-3, residuals[:1])
  assert memory.backend_options["reorder"] == report["reorder"]
  # A large addition rebuilds ScaNN over all keys, still with the tuned settings.
  more = clustered_points(2_100, 16, seed=60)[0]
  memory.add(more, np.zeros((len(more), 1), np.float32))
  assert memory.index.indexed == memory.size == 22_101
  assert {k: memory.index.query_settings()[k] for k in ("leaves_to_search", "reorder")} == \
      {"leaves_to_search": report["leaves_to_search"], "reorder": report["reorder"]}


def test_tune_search_rejects_what_it_cannot_tune():
  keys, queries = clustered_points(3_000, 8, num_queries=20, seed=7)
  residuals = np.zeros((len(keys), 1), np.float32)
  with pytest.raises(ValueError, match="scann backend"):
    build_memory(keys, residuals, backend="exact").tune_search(queries, 5)
  with pytest.raises(ValueError, match="brute force"):
    build_memory(keys, residuals, backend="scann").tune_search(queries, 5)
  memory = build_memory(keys, residuals, backend="scann", mode="tree_ah", num_leaves=20)
  with pytest.raises(ValueError, match="target_recall"):
    memory.tune_search(queries, 5, target_recall=1.5)
  with pytest.raises(ValueError, match="k must be"):
    memory.tune_search(queries, 0)
  with pytest.raises(ValueError, match="NaN"):
    memory.tune_search(np.full_like(queries, np.nan), 5)
  with pytest.raises(ValueError, match="dimension"):
    memory.tune_search(queries[:, :4], 5)
  with pytest.raises(ValueError, match="empty"):
    memory.tune_search(queries[:0], 5)
  with pytest.raises(ValueError, match="grid is empty"):
    memory.tune_search(queries, 5, reorder_grid=())
  with pytest.raises(ValueError, match="unknown scann query settings"):
    memory.index.set_query_settings(leaves=3)
  with pytest.raises(ValueError, match="reorder must be an integer >= 0"):
    memory.index.set_query_settings(reorder=-5)
  assert memory.index.query_settings() == {"leaves_to_search": 8, "reorder": 150}


def test_benchmark_rows_report_measured_recall(capsys):
  from resmem_jax.bench import memory_search
  memory_search.run_search_benchmark(4_000, 8, 300, 5, {"mode": "tree_ah", "num_leaves": 20},
                                     hnsw_ef=[16], with_faiss=False, repeats=1, tune_recall=0.95)
  rows = {line[:28].strip(): line.split() for line in capsys.readouterr().out.splitlines()
          if not line.startswith(" ")}
  assert float(rows["exact (jax)"][-1]) == 1.0
  assert 0.0 < float(rows["scann tree_ah"][-1]) <= 1.0
  assert float(rows["scann tuned (target 0.95)"][-1]) >= 0.9  # tuned on other queries
  assert float(rows["scann tuned (target 0.95)"][-2]) > 0  # queries per second


def test_tune_search_caps_the_number_of_queries():
  keys, queries = clustered_points(5_000, 8, num_queries=500, seed=8)
  memory = build_memory(keys, np.zeros((len(keys), 1), np.float32), backend="scann",
                        mode="tree_ah", num_leaves=30)
  report = memory.tune_search(queries, 5, target_recall=0.9, max_queries=100, repeats=1)
  assert report["num_queries"] == 100 and report["met_target"]
  assert len(report["tried"]) >= 1 and all(t["seconds"] > 0 for t in report["tried"])


def test_scann_options_out_of_range_and_tiny_trees_are_refused_in_one_line():
  keys, queries = clustered_points(4_000, 8, num_queries=20, seed=9)
  residuals = np.zeros((len(keys), 1), np.float32)
  with pytest.raises(ValueError, match=r"scann mode tree_ah needs at least 16 keys .*got 5; use "
                                       r"mode=brute_force"):
    build_memory(keys[:5], residuals[:5], backend="scann", mode="tree_ah")
  build_memory(keys[:16], residuals[:16], backend="scann", mode="tree_ah").search(queries, 3)
  for mode in ("ah", "tree_ah"):
    with pytest.raises(ValueError, match=r"training_sample_size=1 is too small: AH learns 16 "
                                         r"centres per block .* of the 4000 keys; set it >= 64"):
      build_memory(keys, residuals, backend="scann", mode=mode, training_sample_size=1)
  # A sample of all of a few keys is no random draw: "ah" over 5 keys, sample 5, builds.
  build_memory(keys[:5], residuals[:5], backend="scann", mode="ah", training_sample_size=5)
  # 4000 keys give a tree of up to 80 leaves: a 64-point sample cannot train it.
  with pytest.raises(ValueError, match=r"training_sample_size=64 is below the tree's 80 leaves .*"
                                       r"set training_sample_size >= 80 or num_leaves <= 64"):
    build_memory(keys, residuals, backend="scann", mode="tree_ah", num_leaves=80,
                 training_sample_size=64)
  for name in ("reorder", "leaves_to_search", "num_leaves"):
    with pytest.raises(ValueError, match=rf"scann option {name} must be at most 2\*\*31 - 1"):
      build_memory(keys, residuals, backend="scann", mode="tree_ah", **{name: 2**31})
  with pytest.raises(ValueError, match=r"num_threads must be at most 1024 \(ScaNN starts that "
                                       r"many threads"):
    build_memory(keys, residuals, backend="scann", mode="tree_ah", num_threads=50_000)


def test_the_deepest_reorder_is_searched_without_overflow():
  keys, queries = clustered_points(3_000, 8, num_queries=20, seed=10)
  residuals = np.zeros((len(keys), 1), np.float32)
  memory = build_memory(keys, residuals, backend="scann", mode="tree_ah", num_leaves=20,
                        leaves_to_search=20, reorder=2**31 - 1)
  _, reference = build_memory(keys, residuals).search(queries, 20)
  # Every leaf searched and every key re-scored: the answer is exact.
  np.testing.assert_array_equal(memory.search(queries, 20)[1], reference)
