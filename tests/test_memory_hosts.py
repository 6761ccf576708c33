"""A memory sharded across hosts (2 local processes on 127.0.0.1, each holding only its rows)
equals the single-host memory of all rows: neighbours, distances, residual rows, predictions."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from resmem_jax.memory import hosts


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("backend,residual_format", [("exact", "dense"), ("approx", "sparse"),
                                                     ("scann", "dense")])
def test_two_hosts_equal_one(tmp_path, backend, residual_format):
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  worker = str(REPO_ROOT / "tests" / "host_memory_worker.py")
  out = str(tmp_path / "result")
  procs = [subprocess.Popen([sys.executable, worker, address, str(i), out, backend,
                             residual_format], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    logs = [proc.communicate(timeout=240)[0] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  for proc, log in zip(procs, logs):
    assert proc.returncode == 0, log[-3000:]
  results = [json.loads((tmp_path / f"result_{i}.json").read_text()) for i in range(2)]
  assert results[0] == results[1]  # every process gets the same answers
  result = results[0]
  if backend == "scann":  # approximate in which ids it finds, per host as on one host
    assert result["overlap"] >= 0.95, result
  else:
    assert result["ids_equal"] and result["distances_equal"], result
    assert result["max_prediction_gap"] < 1e-5
    assert result["loaded_equal"]
  assert result["tie_id"] == 3  # keys 3 (host 0) and 700 (host 1) are equal: the lower id wins
  assert result["rows_equal"] and result["dense_equal"] and result["labels_equal"]
  assert "queries differ between processes" in result["mismatch"]
  assert sorted(os.listdir(tmp_path / "result_memory")) == ["process_0", "process_1"]


def test_one_process_is_the_plain_memory(tmp_path):
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(300, 5)).astype(np.float32)
  residuals = rng.normal(size=(300, 3)).astype(np.float32)
  sharded = hosts.build_host_sharded_memory(keys, residuals)
  assert sharded.size == 300 and sharded.offset == 0
  queries = rng.normal(size=(20, 5)).astype(np.float32)
  np.testing.assert_array_equal(sharded.search(queries, 4)[1], sharded.local.search(queries, 4)[1])
  with pytest.raises(ValueError, match="k must be in"):
    sharded.search(queries, 301)
  with pytest.raises(ValueError, match="built without labels"):
    sharded.labels_of(np.arange(3))
  sharded.save(tmp_path / "m")
  np.testing.assert_array_equal(hosts.HostShardedMemory.load(tmp_path / "m").search(queries, 4)[1],
                                sharded.search(queries, 4)[1])
  with pytest.raises(FileNotFoundError, match="load with the process count that saved it"):
    hosts.HostShardedMemory.load(tmp_path / "nothing")
