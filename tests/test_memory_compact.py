"""Compact rows (issue 21): keys stored as bfloat16 / int8, sparse float16 residuals, ScaNN holding
no float copy, a memory streamed from disk shards (resuming after a kill), and the job with each."""
import json
import os
import shutil
import tempfile

import numpy as np
import pytest

from conftest import digits_settings
from resmem_jax.bench.synthetic import clustered_points
from resmem_jax.core.residuals import residuals as make_residuals
from resmem_jax.jobs import engine
from resmem_jax.memory import build_memory, io, load_memory, scann_files, shards
from resmem_jax.memory import keys as keys_lib
from resmem_jax.memory import scann as scann_lib
from resmem_jax.memory import store as store_lib


def _data(n=20000, d=32, seed=0):
  keys, queries = clustered_points(n, d, num_queries=300, seed=seed)
  rng = np.random.default_rng(seed)
  res = make_residuals(rng.integers(0, 12, n), rng.normal(size=(n, 12)).astype(np.float32), 1.0)
  return keys, queries, res


def _top_ids_agreement(found, reference):
  recall = np.mean([len(set(a) & set(b)) / a.size for a, b in zip(found, reference, strict=True)])
  same = np.mean([set(a) == set(b) for a, b in zip(found, reference, strict=True)])
  return recall, same


# Measured on this data (seeds 0-2): the same ten ids for 97-99% of queries with bfloat16, 100%
# with float16, 93-95% with int8 (8 bits per entry cannot keep the 10th and 11th neighbours of
# dense clusters apart on every query); recall@10 >= 0.993 for all three.
@pytest.mark.parametrize("key_format,min_same", [("bfloat16", 0.95), ("float16", 0.99),
                                                 ("int8", 0.90)])
@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_compact_keys_find_the_float32_neighbours_and_save_as_built(backend, key_format, min_same,
                                                                   tmp_path):
  keys, queries, res = _data()
  _, reference = build_memory(keys, res).search(queries, 10)
  memory = build_memory(keys, res, backend=backend, key_format=key_format)
  distances, ids = memory.search(queries, 10)
  recall, same = _top_ids_agreement(ids, reference)
  assert recall >= 0.99 and same >= min_same, (recall, same)
  assert memory.key_format == key_format
  assert memory.bytes_per_example()["keys"] == {"bfloat16": 2 * 32 + 2, "float16": 2 * 32 + 6,
                                                "int8": 32 + 6}[key_format]
  # The distances are those of the stored keys, exact for them.
  stored = memory.key_store.take(ids)
  np.testing.assert_allclose(distances, np.linalg.norm(stored - queries[:, None], axis=-1),
                             rtol=1e-5)
  memory.save(tmp_path / "m")
  loaded = load_memory(tmp_path / "m")
  assert loaded.key_format == key_format
  for a, b in zip(loaded.search(queries, 10), (distances, ids), strict=True):
    np.testing.assert_array_equal(a, b)
  assert json.loads((tmp_path / "m" / "manifest.json").read_text())["key_dtype"] == key_format
  # Added keys are coded with the build's centroids and found at once.
  memory.add(queries[:3] + 1e-3, res[:3])
  assert list(memory.search(queries[:3], 1)[1][:, 0]) == [20000, 20001, 20002]


def test_compact_codes_keep_their_error_bound_at_any_magnitude():
  rng = np.random.default_rng(3)
  for scale in (1e-30, 1.0, 1e30):
    keys = (scale * rng.normal(size=(3000, 16))).astype(np.float32)
    for key_format in ("int8", "float16", "bfloat16"):
      store = keys_lib.KeyStore.from_float32(keys, key_format)
      residual = keys - store.centroids[store.centroid_ids]
      largest = np.abs(residual).max(axis=1, keepdims=True)
      bound = {"int8": largest / 254, "float16": largest * 2.0 ** -12,
               "bfloat16": np.abs(residual) * 2.0 ** -8}[key_format]
      assert np.all(np.abs(store.float32() - keys) <= bound * 1.001 + 1e-45), (scale, key_format)


def test_sparse_float16_residuals_are_half_the_bytes_and_saved_as_such(tmp_path):
  keys, queries, res = _data(3000, 8)
  a = build_memory(keys, res, residual_format="sparse", top_m=4)
  b = build_memory(keys, res, residual_format="sparse_float16", top_m=4)
  assert b.bytes_per_example()["residuals"] == 5 * 4 < a.bytes_per_example()["residuals"]
  ids = np.arange(3000)
  assert np.abs(b.gather_residuals(ids) - a.gather_residuals(ids)).max() <= 2.0 ** -11
  b.save(tmp_path / "m")
  loaded = load_memory(tmp_path / "m")
  assert loaded.residual_format == "sparse_float16"
  np.testing.assert_array_equal(loaded.gather_residuals(ids), b.gather_residuals(ids))


def test_scann_keeps_no_float_copy_and_reranks_from_the_memory(tmp_path):
  keys, queries, res = _data(30000, 16)
  memory = build_memory(keys, res, backend="scann", mode="tree_ah", num_leaves=100, reorder=200,
                        key_format="int8")
  assert not hasattr(memory.index, "keys")
  before = memory.search(queries, 10)
  memory.save(tmp_path / "m")
  index_files = os.listdir(tmp_path / "m" / "index")
  # No float copy; the 4-bit AH codes packed two to a byte (17 blocks: 16 dims + the extra one).
  assert "dataset.npy" not in index_files and "hashed_dataset.npy" not in index_files
  packed = np.load(tmp_path / "m" / "index" / scann_files.PACKED_CODES)
  assert packed.shape == (30000, 9) and packed.dtype == np.uint8
  assert len(memory.index.candidates(queries, 10)[0]) == 200  # the AH candidates, re-ranked here
  _, reference = build_memory(keys, res).search(queries, 10)
  assert _top_ids_agreement(memory.search(queries, 10)[1], reference)[0] >= 0.95
  # The save read the index back from its files (the streamed build's slack dropped): the same
  # answers before and after it, and from the loaded memory.
  assert not memory.index.upserted
  for after in (memory.search(queries, 10), load_memory(tmp_path / "m").search(queries, 10)):
    for a, b in zip(before, after, strict=True):
      np.testing.assert_array_equal(a, b)


def test_scann_codes_unpack_to_what_scann_wrote_and_old_folders_still_load(tmp_path,
                                                                           monkeypatch):
  scratch = tmp_path / "scratch"  # where loading unpacks the codes
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  keys, queries, _ = _data(3000, 7)
  index = scann_lib.ScannIndex.build(keys_lib.KeyStore.from_float32(keys, "float32"),
                                     {"mode": "tree_ah", "num_leaves": 10, "reorder": 50})
  ours, theirs = tmp_path / "ours", tmp_path / "theirs"
  ours.mkdir()
  theirs.mkdir()
  index.searcher.serialize(str(theirs), relative_path=True)  # ScaNN's own layout, one code a byte
  codes = np.load(theirs / scann_files.CODES)
  assert codes.shape == (3000, 8) and codes.max() <= 15
  columns = scann_files.write(index.searcher, str(ours))
  assert columns == 8 and not (ours / scann_files.CODES).exists()
  packed = np.load(ours / scann_files.PACKED_CODES)
  np.testing.assert_array_equal(packed, codes[:, 0::2] | (codes[:, 1::2] << 4))
  scann = scann_lib._import_scann()  # pylint: disable=protected-access
  expected = index.candidates(queries, 10)
  for folder, cols in ((ours, columns), (theirs, None)):
    index.searcher = scann_files.read(scann, str(folder), cols)
    np.testing.assert_array_equal(index.candidates(queries, 10), expected)
  assert os.listdir(scratch) == []  # the unpacked copy is gone
  # An odd number of blocks: 7 dims + the extra one is even, 6 + 1 is odd.
  index6 = scann_lib.ScannIndex.build(keys_lib.KeyStore.from_float32(keys[:, :6], "float32"),
                                      {"mode": "tree_ah", "num_leaves": 10, "reorder": 50})
  odd = tmp_path / "odd"
  odd.mkdir()
  assert scann_files.write(index6.searcher, str(odd)) == 7
  expected = index6.candidates(queries[:, :6], 10)
  index6.searcher = scann_files.read(scann, str(odd), 7)
  np.testing.assert_array_equal(index6.candidates(queries[:, :6], 10), expected)
  with pytest.raises(ValueError, match="expected uint8"):
    scann_files.read(scann, str(odd), 9)


def test_a_save_stands_when_the_index_cannot_be_read_back(tmp_path, monkeypatch, caplog):
  keys, queries, res = _data(3000, 8)
  memory = build_memory(keys, res, backend="scann", mode="tree_ah", num_leaves=10, reorder=50)
  expected = memory.search(queries, 10)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))  # nowhere to unpack
  memory.save(tmp_path / "m")
  assert memory.index.upserted and "kept the ScaNN index as built" in caplog.text
  monkeypatch.undo()
  for answers in (memory.search(queries, 10), load_memory(tmp_path / "m").search(queries, 10)):
    for a, b in zip(answers, expected, strict=True):
      np.testing.assert_array_equal(a, b)


def test_a_memory_saved_without_packed_codes_still_loads(tmp_path):
  keys, queries, res = _data(3000, 8)
  memory = build_memory(keys, res, backend="scann", mode="tree_ah", num_leaves=10, reorder=50)
  expected = memory.search(queries, 10)
  memory.save(tmp_path / "m")
  # Rewrite the folder as a save before packing wrote it: ScaNN's own codes file, no column count.
  index_dir = tmp_path / "m" / "index"
  packed = np.load(index_dir / scann_files.PACKED_CODES)
  codes = np.stack([packed & 15, packed >> 4], axis=2).reshape(3000, -1)[:, :9]
  np.save(index_dir / scann_files.CODES, codes)
  os.remove(index_dir / scann_files.PACKED_CODES)
  manifest_path = tmp_path / "m" / "manifest.json"
  manifest = json.loads(manifest_path.read_text())
  del manifest["index"]["packed_code_columns"]
  del manifest["files"]["index/" + scann_files.PACKED_CODES]
  manifest["files"]["index/" + scann_files.CODES] = io._digest_file(  # pylint: disable=protected-access
      str(index_dir / scann_files.CODES))
  manifest["manifest_sha256"] = io._manifest_digest(manifest)  # pylint: disable=protected-access
  manifest_path.write_text(json.dumps(manifest))
  for a, b in zip(load_memory(tmp_path / "m").search(queries, 10), expected, strict=True):
    np.testing.assert_array_equal(a, b)


def _write_shards(folder, keys, res, rows_per_shard):
  for i, start in enumerate(range(0, len(keys), rows_per_shard)):
    part = slice(start, start + rows_per_shard)
    shards.write_shard(folder, i, keys[part], store_lib.make_store(res[part], "sparse", 4).arrays(),
                       labels=np.arange(len(keys))[part] % 12)


@pytest.mark.parametrize("key_format", ["float32", "float16", "int8"])
def test_a_memory_built_from_shards_equals_the_one_built_in_ram(key_format, tmp_path):
  keys, queries, res = _data(12000, 16)
  _write_shards(tmp_path, keys, res, 5000)
  assert shards.completed(tmp_path) == [0, 1, 2]
  streamed = shards.build_memory_from_shards(tmp_path, num_outputs=12, backend="scann",
                                             key_format=key_format,
                                             residual_format="sparse_float16", top_m=4)
  in_ram = build_memory(keys, res, backend="scann", key_format=key_format,
                        residual_format="sparse_float16", top_m=4, labels=np.arange(12000) % 12)
  (d1, i1), (d2, i2) = streamed.search(queries, 10), in_ram.search(queries, 10)
  np.testing.assert_array_equal(i1, i2)
  np.testing.assert_allclose(d1, d2, rtol=1e-6)
  np.testing.assert_array_equal(streamed.gather_residuals(i1), in_ram.gather_residuals(i2))
  np.testing.assert_array_equal(streamed.labels, in_ram.labels)


def test_a_shard_is_whole_or_absent_and_a_gap_is_not_trusted(tmp_path, monkeypatch):
  keys, _, res = _data(3000, 8)
  _write_shards(tmp_path, keys[:2000], res[:2000], 1000)
  real_replace = os.replace

  def killed(src, dst):
    raise KeyboardInterrupt("killed at the rename")

  monkeypatch.setattr(os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    _write_shards(tmp_path / "x", keys, res, 1000)
  monkeypatch.setattr(os, "replace", real_replace)
  assert shards.completed(tmp_path / "x") == []  # the partial file is not a shard
  shards.write_shard(tmp_path, 3, keys[:10], store_lib.make_store(res[:10], "sparse", 4).arrays())
  assert shards.completed(tmp_path) == [0, 1]  # shard 3 beyond the missing 2 is ignored
  assert shards.prepare(tmp_path, {"model": "a"}) == []  # no spec yet: shards cleared
  assert shards.completed(tmp_path) == [] and not any(p.suffix == ".npz" for p in tmp_path.iterdir())


_digits = digits_settings


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("compact_digits")
  return workdir, engine.run(_digits(), workdir, progress=False)


def _fresh_memory(workdir, name):
  target = workdir.parent / f"{workdir.name}_{name}"
  shutil.copytree(workdir, target, ignore=shutil.ignore_patterns("memory", "results.json"))
  return target


@pytest.mark.parametrize("key_format", ["bfloat16", "float16", "int8"])
def test_the_job_runs_with_each_key_format(digits_workdir, key_format):
  workdir, first = digits_workdir
  results = engine.run(_digits(key_format=key_format, residual_format="sparse_float16", top_m=4),
                       _fresh_memory(workdir, key_format), progress=False)
  assert results["memory"]["key_format"] == key_format
  assert results["memory"]["residual_format"] == "sparse_float16"
  assert results["base"] == first["base"]  # the same model
  assert abs(results["resmem"]["test_accuracy"] - first["resmem"]["test_accuracy"]) <= 0.02


def test_the_streamed_build_gives_the_same_results_and_resumes_after_a_kill(digits_workdir,
                                                                            monkeypatch):
  workdir, _ = digits_workdir
  # The in-RAM build with the same inference batches (5 of 256 training rows) as reference.
  first = engine.run(_digits(eval_batch_size=256), _fresh_memory(workdir, "in_ram"),
                     progress=False)
  target = _fresh_memory(workdir, "streamed")
  settings = _digits(eval_batch_size=256, shard_dir=str(target / "shards"), shard_rows=1)
  real_write = shards.write_shard
  calls = []

  def killed_after_two(*args, **kwargs):
    if len(calls) == 2:
      raise KeyboardInterrupt("killed during the pass")
    calls.append(args[1])
    return real_write(*args, **kwargs)

  monkeypatch.setattr(shards, "write_shard", killed_after_two)
  with pytest.raises(KeyboardInterrupt):
    engine.run(settings, target, progress=False)
  assert shards.completed(target / "shards") == [0, 1]
  monkeypatch.setattr(shards, "write_shard",
                      lambda *a, **k: (calls.append(a[1]), real_write(*a, **k))[1])
  results = engine.run(settings, target, progress=False)
  assert calls[2:] == list(range(2, len(calls)))  # the rerun wrote shard 2 onwards only
  assert len(calls) >= 4
  for head in ("base", "resmem"):
    assert results[head] == first[head], head
  assert results["hparams"] == first["hparams"]
