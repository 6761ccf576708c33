"""The index interface and registry: a new backend is one class + one registry entry; config
checks name the field; zero queries work on every backend."""
import os

import numpy as np
import pytest
from conftest import run_python

from resmem_jax import memory as memory_lib
from resmem_jax.memory import index as index_lib


class NumpyIndex(index_lib.SearchIndex):
  """A tiny backend for the test: NumPy brute force over every key, its keys saved as a file."""

  OPTION_NAMES = ("spare",)

  def __init__(self, keys, spare):
    # The memory's KeyStore: float32() is every key, decoded.
    self.keys = keys.float32()
    self.size, self.options = self.keys.shape[0], {"spare": spare}

  @classmethod
  def check_options(cls, options):
    index_lib.check_option_names("numpy backend options", options, cls.OPTION_NAMES)
    return {"spare": index_lib.integer_option("numpy", "spare", options.get("spare", 0), 0)}

  @classmethod
  def build(cls, keys, options):
    return cls(keys, cls.check_options(options)["spare"])

  def candidates(self, queries, k):
    dist = ((queries[:, None, :] - self.keys[None]) ** 2).sum(-1)
    ids = np.argsort(dist, axis=1, kind="stable")[:, :min(k + self.options["spare"], self.size)]
    return ids[:, ::-1].astype(np.int32)  # deliberately unranked: the memory re-ranks

  def extend(self, keys):
    return NumpyIndex(keys, self.options["spare"])

  def save(self, directory):
    np.save(os.path.join(directory, "copy.npy"), self.keys)
    return {"spare": self.options["spare"], "size": self.size}

  @classmethod
  def load(cls, directory, keys, info):
    copy = np.load(os.path.join(directory, "copy.npy"))
    if copy.shape[0] != info["size"]:
      raise ValueError(f"numpy index holds {copy.shape[0]} keys, its info says {info['size']}")
    return cls(keys, info["spare"])


@pytest.fixture
def numpy_backend(monkeypatch):
  monkeypatch.setitem(index_lib.BACKENDS, "numpy", f"{__name__}:NumpyIndex")
  return "numpy"


def test_a_registered_backend_works_everywhere(numpy_backend, tmp_path):
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(200, 5)).astype(np.float32)
  res = rng.normal(size=(200, 3)).astype(np.float32)
  queries = rng.normal(size=(25, 5)).astype(np.float32)
  memory = memory_lib.build_memory(keys, res, backend=numpy_backend, spare=2)
  assert isinstance(memory.index, NumpyIndex) and memory.backend_options == {"spare": 2}
  exact = memory_lib.build_memory(keys, res)
  for a, b in zip(memory.search(queries, 6), exact.search(queries, 6)):
    np.testing.assert_array_equal(a, b)  # unranked candidates come back sorted and exact
  memory.add(queries[:2], res[:2])
  np.testing.assert_array_equal(memory.search(queries[:2], 1)[1][:, 0], [200, 201])
  memory.save(tmp_path / "mem")
  loaded = memory_lib.load_memory(tmp_path / "mem")
  assert loaded.backend == "numpy" and loaded.size == 202
  np.testing.assert_array_equal(loaded.search(queries, 4)[1], memory.search(queries, 4)[1])
  assert memory_lib.check_options("numpy", "spare=3", "dense") == {"spare": 3}
  with pytest.raises(ValueError, match=r"resmem.backend_options='spar=3': unknown numpy backend "
                                       r"options \['spar'\] \(did you mean 'spare'\?\)"):
    memory_lib.check_options("numpy", "spar=3", "dense")
  assert not memory_lib.has_query_settings("numpy", 10 ** 6, {})
  with pytest.raises(ValueError, match="NumpyIndex has no query-time settings"):
    memory.tune_search(queries, 3)


def test_an_index_returning_too_few_candidates_is_caught(numpy_backend, monkeypatch):
  rng = np.random.default_rng(1)
  keys = rng.normal(size=(20, 3)).astype(np.float32)
  memory = memory_lib.build_memory(keys, np.zeros((20, 1), np.float32), backend=numpy_backend)
  monkeypatch.setattr(NumpyIndex, "candidates", lambda self, q, k: np.zeros((len(q), k - 1), np.int32))
  with pytest.raises(ValueError, match="at least min\\(k, size\\) ids"):
    memory.search(keys[:2], 3)
  # Wide enough but wrong: repeated or out of range ids are a bug in the index.
  for bad, message in (([0, 0, 0, 0], "the same id twice"), ([0, 1, 20, 21], r"outside \[0, 20\)"),
                       ([0, 1, -2, 3], r"outside \[0, 20\)")):
    monkeypatch.setattr(NumpyIndex, "candidates",
                        lambda self, q, k, bad=bad: np.tile(np.int32(bad), (len(q), 1)))
    with pytest.raises(ValueError, match=f"NumpyIndex.candidates returned .*{message}"):
      memory.search(keys[:2], 3)
  # -1 is "no answer": rows short of k real ids are searched exhaustively by the memory.
  exact = memory_lib.build_memory(keys, np.zeros((20, 1), np.float32))
  monkeypatch.setattr(NumpyIndex, "candidates",
                      lambda self, q, k: np.tile(np.int32([0, 1, -1, -1]), (len(q), 1)))
  for a, b in zip(memory.search(keys[:5] + 0.01, 3), exact.search(keys[:5] + 0.01, 3)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend,options", [
    ("exact", {}), ("exact", {"block_size": 16}), ("scann", {}),
    ("scann", {"mode": "tree_ah", "num_leaves": 10}), ("approx", {}), ("numpy", {})])
def test_zero_queries_on_every_backend(numpy_backend, backend, options):
  rng = np.random.default_rng(2)
  keys = rng.normal(size=(1000, 4)).astype(np.float32)
  memory = memory_lib.build_memory(keys, np.zeros((1000, 2), np.float32), backend=backend, **options)
  memory.add(keys[:3] + 1.0, np.zeros((3, 2), np.float32))  # scann: a side buffer too
  distances, ids = memory.search(np.zeros((0, 4), np.float32), 5)
  assert distances.shape == ids.shape == (0, 5)
  assert distances.dtype == np.float32 and ids.dtype == np.int32
  assert memory.residual_rows(ids)[0].shape == (0, 5, 2)
  assert memory.index.candidates(np.zeros((0, 4), np.float32), 5).shape[0] == 0
  with pytest.raises(ValueError, match="queries have dimension 3"):
    memory.search(np.zeros((0, 3), np.float32), 5)


def test_check_options_names_the_config_field():
  check = memory_lib.check_options
  assert check("scann", "mode=tree_ah, num_leaves=400,reorder=300.0", "sparse") == {
      "mode": "tree_ah", "num_leaves": 400, "reorder": 300}
  assert check("exact", {"block_size": 64}, "dense") == {"block_size": 64}
  assert check("scann", "", "bfloat16") == {}
  cases = [
      (("annoy", "", "dense"), r"^resmem.backend must be one of \['exact', 'scann', 'approx'\], got 'annoy'"),
      (("exakt", "", "dense"), r"resmem.backend .*\(did you mean 'exact'\?\)"),
      (("scann", "mode=tre_ah", "dense"),
       r"^resmem.backend_options='mode=tre_ah': scann option mode must be one of "
       r"\['brute_force', 'ah', 'tree_ah'\], got 'tre_ah' \(did you mean 'tree_ah'\?\)$"),
      (("scann", "num_leafs=4", "dense"),
       r"^resmem.backend_options=.*unknown scann backend options \['num_leafs'\] "
       r"\(did you mean 'num_leaves'\?\); valid: \['mode'"),
      (("scann", "reorder=many", "dense"), r"resmem.backend_options=.*reorder must be an integer"),
      (("scann", "num_leaves=2.5", "dense"), r"num_leaves must be an integer >= 1, got 2.5"),
      (("scann", "distance=cosine", "dense"), r"distance must be one of \['mips_l2', 'squared_l2'\]"),
      (("scann", "quantization_threshold=x", "dense"), r"quantization_threshold must be a finite"),
      (("exact", "block_size=0", "dense"), r"resmem.backend_options=.*block_size must be an integer >= 1"),
      (("exact", "mode=tree_ah", "dense"), r"unknown exact backend options \['mode'\]"),
      (("scann", "mode", "dense"), r"resmem.backend_options entries must be key=value, got 'mode'"),
      (("exact", "", "sprase"),
       r"^resmem.residual_format must be one of \['dense', 'bfloat16', 'sparse', 'sparse_float16'\], "
       r"got 'sprase' \(did you mean 'sparse'\?\)$"),
      (("exact", "", "dense", "int4"),
       r"^resmem.key_format must be one of \['float32', 'bfloat16', 'float16', 'int8'\], got 'int4'"),
  ]
  for args, message in cases:
    with pytest.raises(ValueError, match=message):
      check(*args)


def test_parse_backend_options():
  assert memory_lib.parse_backend_options("mode=tree_ah,num_leaves=400,quantization_threshold=0.2") == {
      "mode": "tree_ah", "num_leaves": 400, "quantization_threshold": 0.2}
  assert memory_lib.parse_backend_options(" , ") == {}
  with pytest.raises(ValueError, match="must be a string"):
    memory_lib.parse_backend_options(None)


def test_has_query_settings_follows_the_resolved_scann_mode():
  assert not memory_lib.has_query_settings("scann", 50_000, {})  # brute force below 100k
  assert memory_lib.has_query_settings("scann", 200_000, {})
  assert memory_lib.has_query_settings("scann", 5_000, {"mode": "ah"})
  assert not memory_lib.has_query_settings("scann", 10 ** 6, {"mode": "brute_force"})
  assert not memory_lib.has_query_settings("exact", 10 ** 6, {})
  with pytest.raises(ValueError, match="scann option mode"):
    memory_lib.has_query_settings("scann", 10, {"mode": "lsh"})


def test_config_checks_do_not_import_scann():
  code = """
import sys
from resmem_jax import memory
memory.check_options("scann", "mode=tree_ah,num_leaves=400", "sparse")
assert memory.has_query_settings("scann", 10 ** 6, {})
try:
  memory.check_options("scann", "mode=tre_ah", "dense")
except ValueError as err:
  print(err)
loaded = sorted(m for m in sys.modules if m == "scann" or m.startswith("scann."))
print("SCANN_MODULES", loaded)
"""
  out = run_python(code).stdout
  assert "did you mean 'tree_ah'" in out
  assert "SCANN_MODULES []" in out
