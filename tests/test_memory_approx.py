"""The on-device ``approx`` backend (``jax.lax.approx_min_k`` per device, merged across devices).

On CPU ``approx_min_k`` is exact, so the backend must agree with ``exact`` id for id, on one
device and on eight fake ones; its recall is also checked on clustered data, the case an
approximate partial reduction finds hardest. Sizes stay small: on CPU the reduction is slow.
"""
import json

import numpy as np
import pytest
from conftest import run_python

from resmem_jax import memory as memory_lib, resmem
from resmem_jax.memory import approx


def _clustered(rng, n, dim, clusters=20, spread=0.05):
  centres = rng.normal(size=(clusters, dim)).astype(np.float32)
  return centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim)).astype(np.float32)


def test_same_neighbours_as_exact_and_recall_on_clustered_data():
  rng = np.random.default_rng(0)
  keys = _clustered(rng, 3000, 16)
  queries = _clustered(rng, 200, 16)
  residuals = rng.normal(size=(3000, 3)).astype(np.float32)
  exact = memory_lib.build_memory(keys, residuals, backend="exact")
  near = memory_lib.build_memory(keys, residuals, backend="approx", recall_target=0.95)
  want_d, want_i = exact.search(queries, 10)
  got_d, got_i = near.search(queries, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got_i, want_i)])
  assert recall >= 0.95
  np.testing.assert_array_equal(got_i, want_i)  # CPU: approx_min_k is exact
  np.testing.assert_array_equal(got_d, want_d)  # both re-ranked by direct distance
  np.testing.assert_allclose(resmem.residual_estimate(near, queries, 10, 0.5),
                             resmem.residual_estimate(exact, queries, 10, 0.5))


@pytest.mark.parametrize("case", ["clusters at +-1000", "outlier at 1e6"])
def test_exact_where_the_expansion_cancels(case):
  """Far clusters and an outlier (see test_memory_numerics.py): the rounding certificate makes
  approx (exact selection on CPU) return the float64 brute force's neighbours."""
  rng = np.random.default_rng(4)
  if case == "clusters at +-1000":
    sign = np.where(rng.random(800) < 0.5, -1.0, 1.0)[:, None]
    keys = (1000.0 * sign + 0.01 * rng.normal(size=(800, 8))).astype(np.float32)
    queries = (keys[:150] + 0.003 * rng.normal(size=(150, 8))).astype(np.float32)
  else:
    keys = (1e-3 * rng.normal(size=(800, 8))).astype(np.float32)
    keys[3] = 1e6
    queries = (keys[10:160] + 3e-4 * rng.normal(size=(150, 8))).astype(np.float32)
  memory = memory_lib.build_memory(keys, np.zeros((800, 1), np.float32), backend="approx")
  distances, ids = memory.search(queries, 10)
  true = np.sqrt(((queries[:, None].astype(np.float64) - keys[None].astype(np.float64)) ** 2)
                 .sum(-1))
  np.testing.assert_array_equal(ids, np.argsort(true, axis=1, kind="stable")[:, :10])
  np.testing.assert_allclose(distances, np.take_along_axis(true, ids, axis=1), rtol=1e-6)


def test_edit_save_load(tmp_path):
  rng = np.random.default_rng(1)
  keys = rng.normal(size=(500, 8)).astype(np.float32)
  residuals = rng.normal(size=(500, 2)).astype(np.float32)
  memory = memory_lib.build_memory(keys, residuals, backend="approx", query_chunk=64)
  extra = keys[:5] + 10.0
  memory.add(extra, np.ones((5, 2), np.float32))
  distances, ids = memory.search(extra, 1)
  np.testing.assert_array_equal(ids[:, 0], np.arange(500, 505))  # the added rows find themselves
  assert np.all(distances == 0)
  memory.save(tmp_path / "m")
  loaded = memory_lib.load_memory(tmp_path / "m")
  assert loaded.backend == "approx" and loaded.index.options == memory.index.options
  queries = rng.normal(size=(70, 8)).astype(np.float32)  # 70 > query_chunk: two calls
  np.testing.assert_array_equal(loaded.search(queries, 7)[1], memory.search(queries, 7)[1])


@pytest.mark.parametrize("options,message", [
    ({"recall_target": 1.5}, "recall_target must be in"),
    ({"recall_target": 0}, "recall_target must be in"),
    ({"query_chunk": 0}, "query_chunk must be an integer >= 1"),
    ({"recal_target": 0.9}, "did you mean 'recall_target'"),
    ({"devices": []}, "devices must be a non-empty list"),
    ({"across_hosts": "yes"}, "across_hosts must be true or false"),
])
def test_bad_options_are_named(options, message):
  with pytest.raises(ValueError, match=message):
    approx.ApproxIndex.check_options(options)


def test_eight_devices_equal_one_device():
  """Keys split over 8 fake devices (uneven: 1,001 rows) give the one-device answer."""
  code = """
import json, jax, numpy as np
from resmem_jax import memory as memory_lib, resmem
assert jax.device_count() == 8
rng = np.random.default_rng(3)
keys = rng.normal(size=(1001, 12)).astype(np.float32)
residuals = rng.normal(size=(1001, 4)).astype(np.float32)
queries = rng.normal(size=(90, 12)).astype(np.float32)
out = {}
for name, devices in (("eight", jax.devices()), ("one", jax.devices()[:1])):
  memory = memory_lib.build_memory(keys, residuals, backend="approx", devices=devices)
  assert memory.index.mesh.size == len(devices)
  d, i = memory.search(queries, 20)
  out[name] = {"ids": i.tolist(), "dist": d.tolist(),
               "pred": resmem.residual_estimate(memory, queries, 20, 0.3).tolist()}
exact = memory_lib.build_memory(keys, residuals, backend="exact")
out["exact"] = {"ids": exact.search(queries, 20)[1].tolist()}
print("RESULT" + json.dumps(out))
"""
  proc = run_python(code, devices=8, timeout=300)
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert out["eight"]["ids"] == out["one"]["ids"] == out["exact"]["ids"]
  np.testing.assert_array_equal(out["eight"]["dist"], out["one"]["dist"])
  np.testing.assert_allclose(out["eight"]["pred"], out["one"]["pred"], rtol=0, atol=1e-6)
