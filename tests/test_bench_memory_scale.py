"""experiments/bench_memory.py --build_from=shards at a tiny size: rows on disk, one process per
method, every method's rows in the printed table and the JSON.

Each scann process imports ScaNN (and TensorFlow with it, about 6 s here), so the default run
covers one key format and the three faiss peers, called in this process; the slow test runs the
command line with all three formats.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from resmem_jax.bench import memory_scale


def _run(tmp_path, key_formats):
  out = tmp_path / "report.json"
  command = [sys.executable, "-m", "experiments.bench_memory", "--build_from=shards",
             "--sizes=6000x16", "--shard_rows=3000", f"--shard_dir={tmp_path / 'shards'}",
             "--num_queries=200", "--clusters=20", f"--key_formats={key_formats}",
             "--scann_options=mode=tree_ah,num_leaves=20", "--scann_leaves_sweep=4,8",
             "--scann_reorders=50", "--ivf_nlist=16", "--ivf_train_rows=3000", "--pq_bytes=4",
             "--nprobes=4", "--rerank_depths=50", "--hnsw_ef=16", "--hnsw_m=8",
             "--repeats=1", f"--out={out}"]
  proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    return proc.stdout, json.load(f)


def _check(stdout, report, key_formats):
  methods = [f"scann {f}" for f in key_formats] + ["faiss IVFPQ", "faiss IVFPQ+rerank",
                                                    "faiss HNSWFlat"]
  rows = report["rows"]
  assert not [r for r in rows if "error" in r], rows
  assert sorted({r["method"] for r in rows}) == sorted(methods)
  for row in rows:
    assert 0.0 <= row["recall"] <= 1.0
    assert row["disk_bytes_per_row"] > 0 and row["ram_bytes_per_row"] > 0
    assert row["peak_rss_gb"] > 0 and row["queries_per_s"] > 0 and row["build_s"] > 0
    assert row["n"] == 6000  # a small HNSW fits its budget: no prefix
    assert row["method"] in stdout
  for fmt in key_formats:  # two leaves settings swept, one row each
    assert len([r for r in rows if r["method"] == f"scann {fmt}"]) == 2
  data = report["data"]
  assert (data["n"], data["d"], data["num_queries"], data["k"]) == (6000, 16, 200, 10)
  assert "queries/s" in stdout and "recall" in stdout


def test_shards_mode_one_key_format(tmp_path):
  # In this process (the CLI's start-up is the slow test's): the same run as the flags below.
  lines = []
  report = memory_scale.run(
      6000, 16, shard_dir=str(tmp_path / "shards"), num_queries=200, num_clusters=20,
      shard_rows=3000, key_formats=["int8"], scann_options={"mode": "tree_ah", "num_leaves": 20},
      scann_leaves=[4, 8], scann_reorders=[50], nlist=16, train_rows=3000, pq_bytes=4,
      nprobes=[4], rerank_depths=[50], hnsw_ef=[16], hnsw_m=8, repeats=1,
      out=str(tmp_path / "report.json"), log=lines.append)
  with open(tmp_path / "report.json") as f:
    assert json.load(f) == report
  _check("\n".join(lines), report, ["int8"])
  assert any("fastest setting" in line for line in lines[-20:])
  # The rows on disk are those the library reads: two complete shards, resumable.
  from resmem_jax.memory import shards  # pylint: disable=g-import-not-at-top
  folder = report["data"]["folder"]
  assert shards.completed(folder) == [0, 1]
  scann = [r for r in report["rows"] if r["method"] == "scann int8"][0]
  # int8 keys: d bytes of codes plus a few (scale, centroid id); sparse_float16 residuals:
  # 17 x (2 + 2); an int32 label.
  stored = scann["stored_bytes_per_row"]
  assert 16 < stored["keys"] < 32 and (stored["residuals"], stored["labels"]) == (68.0, 4.0)


@pytest.mark.slow
def test_shards_mode_every_key_format(tmp_path):
  formats = ["float32", "bfloat16", "float16", "int8"]
  stdout, report = _run(tmp_path, ",".join(formats))
  _check(stdout, report, formats)
  # The first format, the peers, then the other formats (a run cut short has the comparison).
  after_peers = stdout.split("faiss HNSWFlat")[-1]
  assert "scann float32" not in after_peers and "scann int8" in after_peers


def test_reference_is_exact(tmp_path):
  spec = memory_scale.data_spec(3000, 8, 20, 0.25, 5, 1, 1000)
  memory_scale.write_data(str(tmp_path), spec, log=lambda *_: None)
  queries = memory_scale.queries_for(spec, 50)
  found = memory_scale.reference(str(tmp_path), spec, queries, 10, log=lambda *_: None)
  keys = np.concatenate([k for _, k in memory_scale.shard_keys(str(tmp_path))])
  assert keys.shape == (3000, 8)
  dist = ((queries[:, None, :].astype(np.float64) - keys[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(found, np.argsort(dist, axis=1, kind="stable")[:, :10])
  # Cached: a second call reads the file.
  assert len([n for n in os.listdir(tmp_path) if n.startswith("reference-")]) == 1
  again = memory_scale.reference(str(tmp_path), spec, queries, 10, log=lambda *_: None)
  np.testing.assert_array_equal(again, found)
  # A prefix reference is the exact top-k of those rows only.
  prefix = memory_scale.exact_top_k(str(tmp_path), queries, 10, limit=1500)
  np.testing.assert_array_equal(prefix, np.argsort(dist[:, :1500], axis=1, kind="stable")[:, :10])


def test_rerank16_and_pq_subquantizers():
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(500, 8)).astype(np.float32)
  queries = rng.normal(size=(7, 8)).astype(np.float32)
  ids = np.tile(np.arange(500), (7, 1))
  ids[:, 0] = -1  # no candidate there
  found = memory_scale._rerank16(queries, keys.astype(np.float16), ids, 5, chunk=3)  # pylint: disable=protected-access
  dist = ((queries[:, None] - keys.astype(np.float16).astype(np.float32)[None]) ** 2).sum(-1)
  dist[:, 0] = np.inf
  np.testing.assert_array_equal(found, np.argsort(dist, axis=1)[:, :5])
  assert memory_scale._pq_subquantizers(128, 64) == 64  # pylint: disable=protected-access
  assert memory_scale._pq_subquantizers(24, 64) == 24  # pylint: disable=protected-access
  assert memory_scale._pq_subquantizers(100, 64) == 50  # pylint: disable=protected-access


def test_summary_picks_the_fastest_row_reaching_each_target():
  def row(method, qps, recall):
    return {"method": method, "setting": f"{qps}", "queries_per_s": qps, "recall": recall,
            "ram_bytes_per_row": 1.0, "disk_bytes_per_row": 1.0}
  rows = [row("a", 100, 0.99), row("a", 300, 0.91), row("a", 500, 0.85), row("b", 50, 0.5),
          {"method": "c", "setting": "failed", "error": "x", "exit_code": 1}]
  lines = memory_scale.summary(rows, targets=(0.9, 0.95))
  assert len(lines) == 5  # a header, then methods a and b (c failed) per target
  assert " 300 " in lines[1] and "best recall 0.5000" in lines[2]
  assert " 100 " in lines[3] and "best recall 0.5000" in lines[4]
