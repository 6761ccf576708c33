"""Save/load round trips and detection of damaged memories."""
import json
import os

import numpy as np
import pytest

from resmem_jax.core.residuals import residuals as make_residuals
from resmem_jax.memory import build_memory, load_memory


def _memory(backend="exact", fmt="dense", n=400, **options):
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(n, 6)).astype(np.float32)
  labels = rng.integers(0, 5, n)
  res = make_residuals(labels, rng.normal(size=(n, 5)).astype(np.float32), 1.0)
  return build_memory(keys, res, backend=backend, residual_format=fmt, top_m=2, labels=labels,
                      metadata={"model": {"name": "resnet", "width": 16}, "step": 1200}, **options)


@pytest.mark.parametrize("backend", ["exact", "scann"])
@pytest.mark.parametrize("fmt", ["dense", "bfloat16", "sparse"])
def test_round_trip(tmp_path, backend, fmt):
  memory = _memory(backend, fmt)
  memory.add(np.full((2, 6), 5.0, np.float32), np.zeros((2, 5), np.float32), labels=[3, 4])
  queries = np.random.default_rng(1).normal(size=(20, 6)).astype(np.float32)
  path = tmp_path / "mem"
  memory.save(path)
  loaded = load_memory(path)
  assert (loaded.size, loaded.dim, loaded.num_outputs) == (402, 6, 5)
  assert (loaded.backend, loaded.residual_format) == (backend, fmt)
  assert loaded.backend_options == memory.backend_options
  assert loaded.metadata == {"model": {"name": "resnet", "width": 16}, "step": 1200}
  np.testing.assert_array_equal(loaded.labels, memory.labels)
  assert loaded.labels.dtype == np.int32 and loaded.labels[-2:].tolist() == [3, 4]
  for a, b in zip(memory.search(queries, 4), loaded.search(queries, 4)):
    np.testing.assert_array_equal(a, b)
  ids = memory.search(queries, 4)[1]
  for a, b in zip(memory.residual_rows(ids), loaded.residual_rows(ids)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(memory.gather_residuals(np.arange(402)),
                                loaded.gather_residuals(np.arange(402)))
  if backend == "scann":  # the side buffer (the 2 added keys) is rebuilt on load
    assert (loaded.index.indexed, loaded.index.size) == (400, 402)
  manifest = json.loads((path / "manifest.json").read_text())
  assert manifest["n"] == 402 and manifest["d"] == 6 and manifest["backend"] == backend
  assert manifest["labels"] is True and "labels.npy" in manifest["files"]
  # Saving over an existing memory replaces it and leaves no temp directories behind.
  loaded.add(np.zeros((1, 6), np.float32), np.zeros((1, 5), np.float32), labels=[0])
  loaded.save(path)
  assert load_memory(path).size == 403
  assert sorted(os.listdir(tmp_path)) == ["mem"]


def test_round_trip_without_labels(tmp_path):
  rng = np.random.default_rng(2)
  memory = build_memory(rng.normal(size=(30, 3)).astype(np.float32),
                        rng.normal(size=(30, 2)).astype(np.float32), block_size=7)
  memory.save(tmp_path / "mem")
  loaded = load_memory(tmp_path / "mem")
  assert loaded.labels is None and not (tmp_path / "mem" / "labels.npy").exists()
  assert loaded.backend_options == {"block_size": 7, "query_chunk": 1024}


def test_truncated_and_corrupt_files(tmp_path):
  path = tmp_path / "mem"
  _memory().save(path)
  keys_file = path / "keys.npy"
  data = keys_file.read_bytes()
  keys_file.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated"):
    load_memory(path)
  keys_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  with pytest.raises(ValueError, match="checksum"):
    load_memory(path)
  keys_file.write_bytes(data)
  load_memory(path)  # intact again
  (path / "residuals.npy").unlink()
  with pytest.raises(ValueError, match="missing"):
    load_memory(path)


def test_corrupt_scann_index_files(tmp_path):
  path = tmp_path / "mem"
  _memory("scann").save(path)
  index_files = sorted(p for p in (path / "index").iterdir() if p.is_file())
  assert index_files  # ScaNN wrote its own files, and the manifest covers them
  target = index_files[0]
  data = target.read_bytes()
  target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  with pytest.raises(ValueError, match="checksum"):
    load_memory(path)


def test_mismatched_manifest(tmp_path):
  path = tmp_path / "mem"
  _memory("scann").save(path)
  original = json.loads((path / "manifest.json").read_text())

  def write(**changes):
    manifest = json.loads(json.dumps(original))
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))

  write(n=999)
  with pytest.raises(ValueError, match="manifest says"):
    load_memory(path)
  write(format_version=1)
  with pytest.raises(ValueError, match="format_version 1"):
    load_memory(path)
  write(backend="annoy")
  with pytest.raises(ValueError, match="names backend 'annoy'"):
    load_memory(path)
  write(index=dict(original["index"], indexed=0))
  with pytest.raises(ValueError, match="indexed count 0"):
    load_memory(path)
  write(index={"indexed": 400})
  with pytest.raises(ValueError, match="index info lacks"):
    load_memory(path)
  write(labels=False, num_outputs=4)
  with pytest.raises(ValueError, match="residuals array has shape"):
    load_memory(path)
  (path / "manifest.json").write_text("{not json")
  with pytest.raises(ValueError, match="corrupt"):
    load_memory(path)
  write()
  assert load_memory(path).size == 400  # intact again


def test_missing(tmp_path):
  with pytest.raises(FileNotFoundError):
    load_memory(tmp_path / "nothing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="manifest"):
    load_memory(tmp_path / "empty")
