"""experiments/bench_accelerator.py: the peak table, the bounds arithmetic, and the run's JSON.

The whole command at tiny sizes takes about a minute on a 2-core CPU (two ResNet-50 compiles and
two jobs): it is marked slow. The default run checks the library entry on the search section.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import pytest

from conftest import REPO_ROOT
from resmem_jax.bench import accelerator

MEASURED = {"bfloat16_tflops": 0.05, "float32_tflops": 0.1, "float32_highest_tflops": 0.09,
            "matmul_size": 64, "read_gbps": 20.0, "read_megabytes": 1}


@pytest.mark.parametrize("kind,name", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL"),
    ("NVIDIA H200", "NVIDIA H200 SXM"),
    ("NVIDIA H200 NVL", "NVIDIA H200 NVL"),
    ("NVIDIA GH200 480GB", "NVIDIA GH200"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 SXM 80GB"),
    ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB"),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100 PCIe 80GB"),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 40GB"),
    ("Tesla V100-SXM2-16GB", "NVIDIA V100 SXM2"),
    ("Tesla V100-PCIE-32GB", "NVIDIA V100 PCIe"),
    ("NVIDIA L4", "NVIDIA L4"),
    ("TPU v4", "TPU v4"),
    ("TPU v5 lite", "TPU v5e"),
    ("TPU v5e", "TPU v5e"),
    ("TPU v5", "TPU v5p"),
    ("TPU v5p", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e"),
])
def test_known_device_kinds_find_their_vendor_peaks(kind, name):
  peak = accelerator.lookup_peak(kind)
  assert peak is not None and peak.name == name
  # Dense peaks: bfloat16 at least float32 (TF32) at least true FP32; bandwidth in GB/s.
  assert peak.bfloat16 >= peak.float32 >= peak.float32_highest > 0
  assert 100 < peak.hbm_gbps < 10_000


def test_vendor_figures_of_the_h100_sxm():
  peak = accelerator.lookup_peak("NVIDIA H100 80GB HBM3")
  assert (peak.bfloat16, peak.float32, peak.float32_highest, peak.hbm_gbps) == (
      989.5, 494.5, 67.0, 3350.0)


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA L40S", "TPU v4 lite", "TPU7x", "NVIDIA RTX 4090"])
def test_unknown_device_kinds_have_no_table_entry(kind):
  assert accelerator.lookup_peak(kind) is None


def test_unknown_device_falls_back_to_the_measured_matmul_and_says_so():
  peaks = accelerator.device_peaks("cpu", MEASURED)
  assert peaks["source"] == accelerator.MEASURED == "measured matmul"
  assert "measured" in peaks["bandwidth_source"]
  assert (peaks["bfloat16_tflops"], peaks["float32_tflops"], peaks["float32_highest_tflops"],
          peaks["hbm_gbps"]) == (0.05, 0.1, 0.09, 20.0)
  known = accelerator.device_peaks("TPU v4", MEASURED)
  assert known["source"] == known["bandwidth_source"] == "vendor table: TPU v4"
  assert known["bfloat16_tflops"] == 275.0 and known["measured"] == MEASURED


def test_measured_peaks_are_positive():
  measured = accelerator.measure_peaks(matmul_size=64, bandwidth_mb=1, repeats=1)
  for key in ("bfloat16_tflops", "float32_tflops", "float32_highest_tflops", "read_gbps"):
    assert math.isfinite(measured[key]) and measured[key] > 0, key


def test_search_bounds_arithmetic():
  # 1M x 128 keys, 10k queries in 10 passes, on one H100 SXM (67 TFLOP/s FP32, 3350 GB/s).
  bounds = accelerator.search_bounds(1_000_000, 128, 10_000, 10, 67.0, 3350.0)
  assert bounds["flops"] == 2 * 1_000_000 * 128 * 10_000
  assert bounds["key_bytes"] == 4 * 1_000_000 * 128 * 10
  assert bounds["flop_bound_s"] == pytest.approx(2.56e12 / 67e12)
  assert bounds["bandwidth_bound_s"] == pytest.approx(5.12e9 / 3.35e12)
  assert bounds["bound_s"] == bounds["flop_bound_s"]  # compute-bound at this size
  two = accelerator.search_bounds(1_000_000, 128, 10_000, 10, 67.0, 3350.0, num_devices=2)
  assert two["flop_bound_s"] == pytest.approx(bounds["flop_bound_s"] / 2)
  timed = accelerator.against_bounds(2 * bounds["flop_bound_s"], 10_000, bounds)
  assert timed["fraction_of_flop_bound"] == pytest.approx(0.5)
  assert timed["queries_per_s"] == pytest.approx(10_000 / (2 * bounds["flop_bound_s"]))
  assert timed["fraction_of_bandwidth_bound"] == pytest.approx(
      bounds["bandwidth_bound_s"] / (2 * bounds["flop_bound_s"]))


def test_mfu():
  assert accelerator.mfu(1e12, 0.01, 250.0) == pytest.approx(0.4)
  assert accelerator.mfu(1e12, 0.01, 250.0, num_devices=4) == pytest.approx(0.1)
  assert accelerator.mfu(None, 0.01, 250.0) is None
  assert accelerator.mfu(float("nan"), 0.01, 250.0) is None


def _goal_result(mfu, exact_fraction, exact_s, approx_s, recall):
  return {"sections": {
      "train": {"rows": [{"model": "resnet50", "dtype": "bfloat16", "mfu": mfu},
                         {"model": "resnet50", "dtype": "float32", "mfu": 0.9}]},
      "search": {"exact": {"end_to_end": {"fraction_of_flop_bound": exact_fraction,
                                          "seconds": exact_s}},
                 "approx": {"end_to_end": {"seconds": approx_s}, "recall": recall}}}}


def test_goals():
  met = accelerator.goals(_goal_result(0.45, 0.6, 1.0, 0.5, 0.97))
  assert all(value is True for value in met.values()), met
  missed = accelerator.goals(_goal_result(0.39, 0.4, 1.0, 0.5, 0.9))
  assert not any(missed.values()), missed
  assert accelerator.goals(_goal_result(0.5, 0.5, 1.0, 2.0, 0.99))[
      "approx_faster_than_exact_at_recall_0.95"] is False
  assert set(accelerator.goals({"sections": {}}).values()) == {None}


def test_failures_name_failed_sections_and_steps():
  result = {"sections": {
      "train": {"rows": [{"model": "resnet50", "dtype": "float32", "error": "OOM"},
                         {"model": "resnet20", "dtype": "float32", "mfu": 0.1}]},
      "mnist": {"error": "no data"}, "search": {"recall": 1.0}}}
  assert accelerator.failures(result) == ["train resnet50 float32: OOM", "mnist: no data"]
  assert accelerator.failures({"sections": {"search": {}}}) == []
  lines = accelerator._train_lines({"rows": [{"model": "resnet50", "dtype": "float32",
                                              "batch_size": 256, "error": "OOM"}]})
  assert "FAILED OOM" in lines[1]


def test_timed_calls_times_and_restores():
  module = types.SimpleNamespace(f=lambda x: x + 1)
  original = module.f
  with accelerator._timed_calls(module, "f") as seconds:
    assert module.f(1) == 2 and module.f(2) == 3
  assert module.f is original and len(seconds) == 2 and all(s >= 0 for s in seconds)


def test_unknown_section_or_size_is_refused():
  with pytest.raises(ValueError, match="unknown sections"):
    accelerator.run(["nosuch"], size="tiny")
  with pytest.raises(ValueError, match="size must be one of"):
    accelerator.run(["search"], size="huge")


def _finite_positive(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_search(search, num_queries):
  for backend in ("exact", "approx"):
    figures = search[backend]
    assert 0.0 <= figures["recall"] <= 1.0
    assert _finite_positive(figures["build_s"])
    for timed in ("end_to_end", "device"):
      t = figures[timed]
      assert _finite_positive(t["seconds"])
      assert t["queries_per_s"] == pytest.approx(num_queries / t["seconds"])
      # Nothing beats its bound: a fraction above 1 means the bound (or the timing) is wrong.
      assert 0 < t["fraction_of_flop_bound"] < 1.0
      assert 0 < t["fraction_of_bandwidth_bound"] < 1.0
    assert figures["bounds"]["key_passes"] >= 1
  assert search["exact"]["recall"] == 1.0  # exact is its own reference


def _check_header(saved):
  assert saved["device"]["device_kind"] and saved["device"]["count"] >= 1
  assert saved["jax"] and saved["jaxlib"]
  if accelerator.lookup_peak(saved["device"]["device_kind"]) is None:
    assert saved["peaks"]["source"] == "measured matmul"
  else:
    assert saved["peaks"]["source"].startswith("vendor table: ")
  for key in ("bfloat16_tflops", "float32_tflops", "float32_highest_tflops", "hbm_gbps"):
    assert _finite_positive(saved["peaks"][key]), key


def test_search_section_through_the_library_entry(tmp_path):
  sizes = dataclasses.replace(accelerator.SIZES["tiny"], search_keys=2048, search_dim=8,
                              search_queries=64, matmul_size=128, bandwidth_mb=4)
  lines = []
  result = accelerator.run(["search"], size="tiny", sizes=sizes, out=str(tmp_path / "a.json"),
                           log=lines.append)
  saved = json.loads((tmp_path / "a.json").read_text())
  assert saved == result and set(saved["sections"]) == {"search"}
  _check_header(saved)
  _check_search(saved["sections"]["search"], 64)
  assert saved["goals"]["resnet50_bfloat16_mfu_at_least_0.40"] is None  # no train section
  table = lines[-2]
  assert "exact, end to end" in table and "approx, device" in table and "goals" in table


@pytest.mark.slow
def test_tiny_command_writes_every_section(tmp_path):
  """The command itself at tiny sizes: every section present and its numbers sane."""
  out = tmp_path / "acc.json"
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_accelerator", "--size=tiny",
                         f"--out={out}", f"--jobs_dir={tmp_path / 'work'}"],
                        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  saved = json.loads(out.read_text())
  assert saved["size"] == "tiny" and set(saved["sections"]) == set(accelerator.SECTIONS)
  assert accelerator.failures(saved) == []
  _check_header(saved)
  rows = saved["sections"]["train"]["rows"]
  assert {(r["model"], r["dtype"]) for r in rows} == {
      (m, d) for m in ("resnet50", "resnet20") for d in ("bfloat16", "float32")}
  for r in rows:
    assert 0 < r["mfu"] < 1.5, r
    assert _finite_positive(r["step_ms"]) and _finite_positive(r["analytic_flops_per_step"])
    assert r["images_per_s"] == pytest.approx(r["batch_size"] / (r["step_ms"] / 1e3))
  resnet50 = [r for r in rows if r["model"] == "resnet50"]
  resnet20 = [r for r in rows if r["model"] == "resnet20"]
  assert resnet50[0]["analytic_flops_per_step"] > resnet20[0]["analytic_flops_per_step"]
  _check_search(saved["sections"]["search"], accelerator.SIZES["tiny"].search_queries)
  for name in ("mnist", "shakespeare"):
    job = saved["sections"][name]
    assert job["data"] == "tfds mock"
    assert job["training_steps"] == accelerator.SIZES["tiny"].job_steps
    for key in ("base_test_accuracy", "resmem_test_accuracy"):
      assert 0.0 <= job[key] <= 1.0
    for key in ("wall_s", "memory_build_s", "memory_build_rows_per_s", "test_query_rows_per_s"):
      assert _finite_positive(job[key]), (name, key)
  assert saved["sections"]["mnist"]["config"] == "mnist:small_mlp"
  assert _finite_positive(saved["sections"]["shakespeare"]["search_queries_per_s"])
  assert "train step" in proc.stdout and "tiny_shakespeare" in proc.stdout
