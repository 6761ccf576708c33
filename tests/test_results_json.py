"""results.json describes itself: versions, source, times, devices, the command line; p-values never
print as 0."""
import datetime
import json
import subprocess
import sys
from importlib import metadata

import pytest

from resmem_jax import settings as settings_lib
from resmem_jax.core import metrics
from resmem_jax.jobs import engine, report, run_info

ARGV = ["resmem-jax", "--config=digits:tiny", "--config.resmem.timing_repeats=1",
        "--workdir=/tmp/somewhere"]


@pytest.fixture(scope="module")
def digits_results(tmp_path_factory):
  from resmem_jax.configs import digits
  cfg = digits.get_config("tiny")
  cfg.resmem.k_grid = (1, 4)
  cfg.resmem.sigma_grid = (1.0,)
  cfg.resmem.temperature_grid = (1.0,)
  cfg.resmem.timing_repeats = 1
  workdir = tmp_path_factory.mktemp("digits_results")
  saved = sys.argv
  sys.argv = list(ARGV)
  try:
    before = datetime.datetime.now(datetime.timezone.utc)
    returned = engine.run(settings_lib.from_config(cfg), workdir, progress=False)
    after = datetime.datetime.now(datetime.timezone.utc)
  finally:
    sys.argv = saved
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(returned))
  return on_disk, before, after


def test_results_json_keeps_its_keys_and_adds_run(digits_results):
  results, _, _ = digits_results
  assert {"dataset", "model", "num_params", "checkpoint_step", "model_digest", "row", "num_rows",
          "base", "resmem", "hparams", "gate", "memory", "comparison", "timing", "training",
          "log_loss_rule", "config", "run"} <= set(results)
  assert results["run"]["schema_version"] == run_info.SCHEMA_VERSION == 1
  assert "test accuracy" in report.format_table(results)


def test_results_json_carries_versions_and_source(digits_results):
  run = digits_results[0]["run"]
  for name in ("resmem_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    assert isinstance(run["versions"][name], str) and run["versions"][name]
  source = run["source"]
  assert set(source) == {"commit", "dirty", "installed_version"}
  if source["commit"] is None:  # not a checkout: the installed version says what ran
    assert source["installed_version"] and source["dirty"] is None
  else:
    head = subprocess.run(["git", "-C", str(run_info.PACKAGE_DIR), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert source["commit"] == head and isinstance(source["dirty"], bool)


def test_results_json_carries_times_devices_and_command_line(digits_results):
  results, before, after = digits_results
  run = results["run"]
  started = datetime.datetime.fromisoformat(run["started"])
  ended = datetime.datetime.fromisoformat(run["ended"])
  assert started.utcoffset() == ended.utcoffset() == datetime.timedelta(0)  # UTC
  assert before <= started <= ended <= after
  assert run["seconds"] == pytest.approx((ended - started).total_seconds(), abs=1e-3)
  devices = run["devices"]
  assert devices["platform"] == "cpu" and devices["count"] >= devices["local_count"] >= 1
  assert devices["device_kind"]
  assert run["processes"] == {"process_count": 1, "process_index": 0}
  assert run["command"] == {"argv": ARGV, "config": "digits:tiny",
                            "overrides": ["resmem.timing_repeats=1"]}


def test_command_line_with_a_separate_config_value_and_without_one():
  line = run_info.command_line(["tool", "--config", "mnist:serving", "--config.seed=3", "--x=1"])
  assert line["config"] == "mnist:serving" and line["overrides"] == ["seed=3"]
  assert run_info.command_line(["python"]) == {"argv": ["python"], "config": None,
                                               "overrides": []}


def test_source_without_git_or_outside_a_checkout(monkeypatch, tmp_path):
  def no_git(*args, **kwargs):
    raise FileNotFoundError("git")
  with monkeypatch.context() as patch:
    patch.setattr(run_info.subprocess, "run", no_git)
    missing = run_info.source()
  assert missing["commit"] is None and missing["dirty"] is None
  assert missing["installed_version"] == metadata.version("resmem_jax")
  monkeypatch.setattr(run_info, "PACKAGE_DIR", tmp_path)  # not a git checkout
  assert run_info.source()["commit"] is None


def test_an_underflowed_p_value_prints_as_below_1e_300():
  assert metrics.format_p_value(0.0) == "< 1e-300"
  assert metrics.format_p(0.0) == "p < 1e-300" and metrics.format_p(5e-324) == "p < 1e-300"
  assert metrics.format_p(0.0312) == "p = 0.031"
  comparison = {"ci95": [0.01, 0.03], "p_value": 0.0, "test_accuracy_gain": 0.02, "gained": 900,
                "lost": 0, "rows": 10_000}
  line = report.format_comparison(comparison)
  assert "McNemar p < 1e-300 (significant at 0.05)" in line and "p = 0" not in line
  trend = {"slope_points_per_decade": 1.0, "ci95": [0.5, 1.5], "p_value": 0.0, "runs": 9,
           "x": "params"}
  sweep = report.format_sweep({"variants": [], "trend": trend}, "model.width")
  assert "p < 1e-300" in sweep and "p = 0" not in sweep


def test_the_gate_sentence_prints_an_underflowed_p_value_as_below_1e_300():
  from resmem_jax import fitting
  block = {"memorize": True, "alpha": 0.05, "select_by": "accuracy",
           "comparator": {"temperature": 1.0},
           "held_out": {"rows": 500, "gain": 0.1, "ci95": [0.05, 0.15], "p_value": 0.0}}
  sentence = fitting.gate_sentence(block)
  assert sentence.endswith("one-sided p < 1e-300") and "p = 0" not in sentence
