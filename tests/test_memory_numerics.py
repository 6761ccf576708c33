"""Search numerics on every backend: huge and tiny magnitudes, shared offsets, the input limit,
ScaNN's padding of short results at large k, duplicate keys (ties) and k = size; ``exact``'s
certificate against the expansion's cancellation (far clusters, an outlier), its error bound,
widening and direct fallback, on one device and on eight."""
import json

import jax
import numpy as np
import pytest
from conftest import run_python

from resmem_jax import mesh as mesh_lib
from resmem_jax.memory import build_memory, exact as exact_lib, memory_from_store
from resmem_jax.memory import scaling, store as store_lib

BACKENDS = {
    "exact": {"backend": "exact"},
    "scann brute force": {"backend": "scann", "mode": "brute_force"},
    "scann tree_ah": {"backend": "scann", "mode": "tree_ah", "num_leaves": 10,
                      "leaves_to_search": 10, "reorder": 300},
}


def _memory(keys, setting):
  return build_memory(keys, np.zeros((len(keys), 2), np.float32), **BACKENDS[setting])


def _true_distances(keys, queries):
  return np.sqrt(((queries[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2)
                 .sum(-1))


def _check_search(memory, keys, queries, k, exact_ids=True):
  """k distinct real ids per query, at their true distances, ascending; the k smallest distances
  (and, with ``exact_ids``, the reference's ids)."""
  distances, ids = memory.search(queries, k)
  assert distances.shape == ids.shape == (len(queries), k)
  assert distances.dtype == np.float32 and ids.dtype == np.int32
  assert np.all((ids >= 0) & (ids < len(keys)))
  assert all(len(set(row)) == k for row in ids.tolist())
  assert np.all(np.isfinite(distances)) and np.all(np.diff(distances, axis=1) >= 0)
  true = _true_distances(keys, queries)
  np.testing.assert_allclose(distances, np.take_along_axis(true, ids, axis=1), rtol=1e-6)
  if exact_ids:
    order = np.argsort(true, axis=1, kind="stable")[:, :k]
    np.testing.assert_allclose(distances, np.take_along_axis(true, order, axis=1), rtol=1e-6)
  return distances, ids


def _points(n, d, scale, seed, offset=0.0):
  return (offset + scale * np.random.default_rng(seed).normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("setting", list(BACKENDS))
@pytest.mark.parametrize("scale", [1e20, 1e29, 1e-25])
def test_huge_and_tiny_keys_and_queries(setting, scale):
  keys, queries = _points(1500, 8, scale, 0), _points(40, 8, scale, 1)
  _, ids = _check_search(_memory(keys, setting), keys, queries, 10,
                         exact_ids=setting != "scann tree_ah")
  order = np.argsort(_true_distances(keys, queries), axis=1, kind="stable")[:, :10]
  if setting == "scann tree_ah":  # approximate in which ids it finds, on any scale
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, order)]) >= 0.95
  else:
    np.testing.assert_array_equal(ids, order)


@pytest.mark.parametrize("setting", list(BACKENDS))
@pytest.mark.parametrize("key_scale,query_scale", [(1.0, 1e20), (1e-30, 1e25), (1e20, 1e-20)])
def test_queries_on_another_scale_than_the_keys(setting, key_scale, query_scale):
  # A query 1e20 times farther out than every key has all keys at (nearly) one distance: any
  # of the nearly tied keys is a right answer, so only the distances are compared.
  keys, queries = _points(1500, 8, key_scale, 2), _points(30, 8, query_scale, 3)
  _check_search(_memory(keys, setting), keys, queries, 5)


@pytest.mark.parametrize("setting", list(BACKENDS))
def test_keys_sharing_a_large_offset(setting):
  # 1000 + 0.01 * noise: the norm expansion without centring ranked these at random.
  keys, queries = _points(1500, 16, 0.01, 4, offset=1000.0), _points(40, 16, 0.01, 5, offset=1000.0)
  _, ids = _check_search(_memory(keys, setting), keys, queries, 10,
                         exact_ids=setting != "scann tree_ah")
  if setting != "scann tree_ah":
    np.testing.assert_array_equal(
        ids, np.argsort(_true_distances(keys, queries), axis=1, kind="stable")[:, :10])


def test_entries_beyond_two_to_the_100_are_refused():
  keys = _points(50, 4, 1.0, 6)
  keys[3, 1] = -2.0 ** 101
  message = (r"^keys has an entry of magnitude 2.54e\+30 \(row 3, column 1\), above the limit "
             r"2\*\*100 = 1.27e\+30 beyond which float32 distances can overflow; scale the "
             r"embeddings down$")
  with pytest.raises(ValueError, match=message):
    build_memory(keys, np.zeros((50, 2), np.float32))
  store = store_lib.make_store(np.zeros((50, 2), np.float32), "dense")
  with pytest.raises(ValueError, match=message):
    memory_from_store(keys, store)
  keys[3, 1] = 2.0 ** 100  # the limit itself is fine
  memory = build_memory(keys, np.zeros((50, 2), np.float32))
  with pytest.raises(ValueError, match=r"^keys has an entry of magnitude 3.4e\+38"):
    memory.add(np.full((1, 4), 3.4e38, np.float32), np.zeros((1, 2), np.float32))
  with pytest.raises(ValueError, match=r"^queries has an entry of magnitude 2.54e\+30 \(row 0, "
                                       r"column 2\)"):
    memory.search(np.array([[0, 0, 2.0 ** 101, 0]], np.float32), 3)
  _check_search(memory, keys, _points(5, 4, 2.0 ** 99, 7), 3)


def test_scann_padding_of_short_results_is_never_returned():
  # 2000 keys in 40 leaves of about 50, one leaf searched: ScaNN pads a request for more
  # neighbours than the leaf holds with id 0 at a NaN score.
  keys, queries = _points(2000, 8, 1.0, 8), _points(60, 8, 1.0, 9)
  memory = build_memory(keys, np.zeros((2000, 2), np.float32), backend="scann", mode="tree_ah",
                        num_leaves=40, leaves_to_search=1, reorder=0)
  index = memory.index
  transformed = np.concatenate([queries - index.center, np.ones((60, 1), np.float32)], axis=1)
  raw_ids, raw_scores = index.searcher.search_batched(transformed, final_num_neighbors=500,
                                                      leaves_to_search=1)
  raw_ids, raw_scores = np.asarray(raw_ids), np.asarray(raw_scores)
  assert np.all(np.isnan(raw_scores).any(axis=1)) and np.all(raw_ids[np.isnan(raw_scores)] == 0)
  exact = build_memory(keys, np.zeros((2000, 2), np.float32))
  for k in (500, 2000):  # every row short: searched again over every leaf
    _, ids = _check_search(memory, keys, queries, k, exact_ids=False)
    reference = exact.search(queries, k)[1]
    assert np.mean([len(set(x) & set(y)) / k for x, y in zip(ids, reference)]) > 0.95
  np.testing.assert_array_equal(_check_search(memory, keys, queries, 2000)[1],
                                exact.search(queries, 2000)[1])  # every key: all of them, exact
  # Some rows short, some not: still k distinct real ids at their true distances, the short
  # ones from every leaf.
  raw_ids, raw_scores = index.searcher.search_batched(transformed, final_num_neighbors=45,
                                                      leaves_to_search=1)
  padded = np.isnan(np.asarray(raw_scores)).any(axis=1)
  assert 0 < padded.sum() < 60
  _, ids = _check_search(memory, keys, queries, 45, exact_ids=False)
  reference = exact.search(queries[padded], 45)[1]
  assert np.mean([len(set(x) & set(y)) / 45 for x, y in zip(ids[padded], reference)]) > 0.95
  # The same through the side buffer of added keys.
  memory.add(queries[:5] + 0.01, np.zeros((5, 2), np.float32))
  all_keys = np.concatenate([keys, queries[:5] + 0.01])
  _, ids = _check_search(memory, all_keys, queries, 500, exact_ids=True)
  assert set(range(2000, 2005)) <= set(ids[:5].ravel().tolist())


@pytest.mark.parametrize("setting", list(BACKENDS))
def test_k_equal_to_the_memory_size(setting):
  keys, queries = _points(700, 6, 1.0, 10), _points(12, 6, 1.0, 11)
  _, ids = _check_search(_memory(keys, setting), keys, queries, 700)
  assert all(sorted(row) == list(range(700)) for row in ids.tolist())


@pytest.mark.parametrize("setting", list(BACKENDS))
def test_duplicate_keys(setting):
  keys = _points(1200, 6, 1.0, 12)
  copies = np.arange(7, 1200, 30)  # 40 copies of one key among the others
  keys[copies] = keys[7]
  memory = _memory(keys, setting)
  queries = np.stack([keys[7], keys[7] + 1e-3, keys[100]])
  distances, ids = _check_search(memory, keys, queries, 5)
  np.testing.assert_array_equal(distances[0], 0.0)
  assert set(ids[0]) <= set(copies) and set(ids[1]) <= set(copies)
  if setting == "exact":  # ties go to the lower id
    np.testing.assert_array_equal(ids[0], copies[:5])
    np.testing.assert_array_equal(ids[1], copies[:5])
  assert ids[2, 0] == 100 and distances[2, 0] == 0.0
  # All 40 copies first (at one distance), then the nearest other keys.
  distances, ids = _check_search(memory, keys, queries[:2], 45)
  assert all(set(row[:40]) == set(copies) for row in ids.tolist())
  assert np.all(distances[:, :40] == distances[:, :1])
  assert np.all(distances[:, 40] > distances[:, 39])


@pytest.mark.parametrize("width,count", [(1024, 5), (1024, 8), (4096, 40), (1000, 5), (256, 3),
                                         (14336, 18)])
def test_two_stage_selection_equals_top_k(width, count):
  """The multi-stage selection of the exact backend returns what one lax.top_k returns, ties (to the
  lower position) and infinities included."""
  import jax.numpy as jnp
  from jax import lax
  from resmem_jax.memory import exact
  rng = np.random.default_rng(width + count)
  score = rng.integers(0, 50, size=(64, width)).astype(np.float32)  # many exact ties
  score[:, -100:] = np.inf  # padding
  score[0] = 7.0  # a row of one value: the lowest positions win
  values, positions = exact._smallest(jnp.asarray(score), count)
  neg, want = lax.top_k(-jnp.asarray(score), count)
  np.testing.assert_array_equal(np.asarray(positions), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(values), -np.asarray(neg))


def far_clusters(offset, seed=20, size=2000, dim=8, spread=0.01, noise=0.003):
  """Keys in two clusters at +-offset (spread 0.01, d = 8) and queries = keys + small noise: the
  expansion's rounding (~ offset**2 * 2**-24) dwarfs the neighbours' distances."""
  rng = np.random.default_rng(seed)
  sign = np.where(rng.random(size) < 0.5, -1.0, 1.0)[:, None]
  keys = (offset * sign + spread * rng.normal(size=(size, dim))).astype(np.float32)
  return keys, (keys + noise * rng.normal(size=keys.shape)).astype(np.float32)


def one_outlier(seed=21, size=2000, dim=8):
  """Keys of scale 1e-3 and one key at 1e6 (which drags the mean to ~500)."""
  rng = np.random.default_rng(seed)
  keys = (1e-3 * rng.normal(size=(size, dim))).astype(np.float32)
  keys[17] = 1e6
  return keys, (keys + 3e-4 * rng.normal(size=keys.shape)).astype(np.float32)


def exact_recall(ids, keys, queries):
  """Recall@k against a float64 brute force, where a returned id counts if its true distance is
  within float32 rounding (1e-6 relative) of the true k-th: distances float32 cannot tell apart
  are ties."""
  true = _true_distances(keys, queries)
  kth = np.sort(true, axis=1)[:, ids.shape[1] - 1:ids.shape[1]]
  return np.mean(np.take_along_axis(true, ids, axis=1) <= kth * (1 + 1e-6))


@pytest.mark.parametrize("case", ["clusters at +-1", "clusters at +-1000", "outlier at 1e6"])
def test_exact_is_exact_where_the_expansion_cancels(case):
  keys, queries = {"clusters at +-1": lambda: far_clusters(1.0),
                   "clusters at +-1000": lambda: far_clusters(1000.0),
                   "outlier at 1e6": one_outlier}[case]()
  memory = build_memory(keys, np.zeros((len(keys), 1), np.float32))
  distances, ids = _check_search(memory, keys, queries, 10, exact_ids=False)
  assert exact_recall(ids, keys, queries) == 1.0
  true = np.sort(_true_distances(keys, queries), axis=1)[:, :10]
  np.testing.assert_allclose(distances, true, rtol=1e-6)  # the k smallest, in float32 rounding
  order = np.argsort(_true_distances(keys, queries), axis=1, kind="stable")[:, :10]
  rows = np.ones(len(keys), bool)
  if case == "outlier at 1e6":  # every other key lies 2.8e6 away within 1e-3: float32 ties
    rows[17] = False
  np.testing.assert_array_equal(ids[rows], order[rows])


def test_lower_bounds_bracket_the_true_scores():
  """The device's lower bound is below the true score and within 3 error bounds of it (what the
  certificate assumes), on data made to cancel, scaled data and an ordinary cloud."""
  rng = np.random.default_rng(22)
  cases = [far_clusters(1000.0, size=600), one_outlier(size=600),
           far_clusters(1e25, size=600, spread=1e22, noise=1e21),
           (rng.normal(size=(600, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)),
           (rng.normal(size=(600, 8)).astype(np.float32), 1e20 * rng.normal(size=(40, 8)).astype(np.float32))]
  mesh = mesh_lib.data_mesh(jax.local_devices()[:1])
  for keys, queries in cases:
    queries = queries[:40]
    layout = exact_lib.ShardedKeys.place(keys, mesh, len(keys))
    part = layout.queries(queries, len(queries))
    qnorms, etas = layout._query_terms(part[:, :-2])  # pylint: disable=protected-access
    low = np.asarray(exact_lib.lower_bounds(part, layout.keys)[:, :len(keys)],
                     np.float64) - etas[:, None]
    centred, _, _ = layout._scaled(queries)  # pylint: disable=protected-access
    m = scaling.query_exponents(centred, layout.exponent)
    unit = np.ldexp(1.0, m + layout.exponent)[:, None]
    exact_keys = keys.astype(np.float64) - layout.center.astype(np.float64)
    wide = centred.astype(np.float64)
    # |q - k|^2 - |q|^2 as |k|^2 - 2 q.k: float64 without cancelling |q|^2 (1e40 for 1e20 queries)
    true = ((exact_keys ** 2).sum(-1)[None] - 2 * wide @ exact_keys.T) / unit
    weights = np.ldexp(1.0, layout.exponent - m)[:, None]
    errors = layout.kappa * (weights * layout.sqnorms + 2 * qnorms[:, None] * layout.norms) + etas[:, None]
    assert np.all(low <= true)
    assert np.all(true <= low + 3 * errors + 2 ** -23 * np.abs(low))


def test_the_certificate_widens_only_where_rounding_could_drop_a_neighbour(monkeypatch):
  counts = []
  original = exact_lib.certified_candidates

  def recording(search, *args):
    return original(lambda rows, count: counts.append((len(rows), count)) or search(rows, count),
                    *args)

  monkeypatch.setattr(exact_lib, "certified_candidates", recording)
  keys, queries = far_clusters(0.01, size=1000)  # one cluster: the first list is certified
  build_memory(keys, np.zeros((1000, 1), np.float32)).search(queries, 10)
  assert counts == [(1000, 18)]
  counts.clear()
  keys, queries = far_clusters(1000.0, size=1000)  # a cluster's 500 keys tie within the rounding
  _, ids = build_memory(keys, np.zeros((1000, 1), np.float32)).search(queries, 10)
  assert counts[0] == (1000, 18) and counts[-1][1] > 500
  assert exact_recall(ids, keys, queries) == 1.0


def test_direct_fallback_past_the_widest_search(monkeypatch):
  monkeypatch.setattr(exact_lib, "MAX_CANDIDATES", 100)  # clusters of ~500: past it at once
  keys, queries = far_clusters(1000.0, size=1000)
  calls = []
  original = exact_lib.direct_nearest
  monkeypatch.setattr(exact_lib, "direct_nearest",
                      lambda q, *args: calls.append(len(q)) or original(q, *args))
  memory = build_memory(keys, np.zeros((1000, 1), np.float32))
  distances, ids = _check_search(memory, keys, queries[:300], 10)
  assert calls == [300]
  np.testing.assert_array_equal(exact_lib.direct_nearest(queries[:300], keys, 10), ids)


def test_far_clusters_on_eight_devices():
  """Keys split over 8 fake devices (1,001 rows: uneven) give the float64 brute force's ids."""
  code = """
import json, jax, numpy as np
from resmem_jax.memory import build_memory
assert jax.device_count() == 8
rng = np.random.default_rng(23)
sign = np.where(rng.random(1001) < 0.5, -1.0, 1.0)[:, None]
keys = (1000.0 * sign + 0.01 * rng.normal(size=(1001, 8))).astype(np.float32)
queries = (keys[:200] + 0.003 * rng.normal(size=(200, 8))).astype(np.float32)
out = {}
for name, backend in (("exact", "exact"), ("approx", "approx")):
  memory = build_memory(keys, np.zeros((1001, 1), np.float32), backend=backend)
  assert memory.index.mesh.size == 8
  out[name] = memory.search(queries, 10)[1].tolist()
print("RESULT" + json.dumps(out))
"""
  out = json.loads(run_python(code, devices=8, timeout=300).stdout.split("RESULT", 1)[1])
  rng = np.random.default_rng(23)
  sign = np.where(rng.random(1001) < 0.5, -1.0, 1.0)[:, None]
  keys = (1000.0 * sign + 0.01 * rng.normal(size=(1001, 8))).astype(np.float32)
  queries = (keys[:200] + 0.003 * rng.normal(size=(200, 8))).astype(np.float32)
  order = np.argsort(_true_distances(keys, queries), axis=1, kind="stable")[:, :10]
  np.testing.assert_array_equal(out["exact"], order)
  np.testing.assert_array_equal(out["approx"], order)
