"""Save/load round trips and detection of damaged memories."""
import json
import os

import numpy as np
import pytest

import resmem_jax


def _memory(backend="exact", fmt="dense", n=400):
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(n, 6)).astype(np.float32)
  res = resmem_jax.residuals(rng.integers(0, 5, n), rng.normal(size=(n, 5)).astype(np.float32), 1.0)
  return resmem_jax.build_memory(keys, res, backend=backend, residual_format=fmt, top_m=2,
                                 metadata={"model": {"name": "resnet", "width": 16}, "step": 1200})


@pytest.mark.parametrize("backend,fmt", [("exact", "dense"), ("exact", "bfloat16"),
                                         ("exact", "sparse"), ("scann", "dense")])
def test_round_trip(tmp_path, backend, fmt):
  memory = _memory(backend, fmt)
  memory.add(np.full((2, 6), 5.0, np.float32), np.zeros((2, 5), np.float32))
  queries = np.random.default_rng(1).normal(size=(20, 6)).astype(np.float32)
  path = tmp_path / "mem"
  memory.save(path)
  loaded = resmem_jax.load_memory(path)
  assert (loaded.size, loaded.dim, loaded.num_outputs) == (402, 6, 5)
  assert (loaded.backend, loaded.residual_format) == (backend, fmt)
  assert loaded.metadata == {"model": {"name": "resnet", "width": 16}, "step": 1200}
  for a, b in zip(memory.search(queries, 4), loaded.search(queries, 4)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(memory.residual_estimate(queries, 4, 0.5),
                                loaded.residual_estimate(queries, 4, 0.5))
  manifest = json.loads((path / "manifest.json").read_text())
  assert manifest["n"] == 402 and manifest["d"] == 6 and manifest["backend"] == backend
  # Saving over an existing memory replaces it and leaves no temp directories behind.
  loaded.add(np.zeros((1, 6), np.float32), np.zeros((1, 5), np.float32))
  loaded.save(path)
  assert resmem_jax.load_memory(path).size == 403
  assert sorted(os.listdir(tmp_path)) == ["mem"]


def test_truncated_and_corrupt_files(tmp_path):
  path = tmp_path / "mem"
  _memory().save(path)
  keys_file = path / "keys.npy"
  data = keys_file.read_bytes()
  keys_file.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated"):
    resmem_jax.load_memory(path)
  keys_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  with pytest.raises(ValueError, match="checksum"):
    resmem_jax.load_memory(path)
  keys_file.write_bytes(data)
  resmem_jax.load_memory(path)  # intact again
  (path / "residuals.npy").unlink()
  with pytest.raises(ValueError, match="missing"):
    resmem_jax.load_memory(path)


def test_mismatched_manifest(tmp_path):
  path = tmp_path / "mem"
  _memory().save(path)
  manifest = json.loads((path / "manifest.json").read_text())
  manifest["n"] = 999
  (path / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match="manifest says"):
    resmem_jax.load_memory(path)
  (path / "manifest.json").write_text("{not json")
  with pytest.raises(ValueError, match="corrupt"):
    resmem_jax.load_memory(path)


def test_missing(tmp_path):
  with pytest.raises(FileNotFoundError):
    resmem_jax.load_memory(tmp_path / "nothing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="manifest"):
    resmem_jax.load_memory(tmp_path / "empty")
