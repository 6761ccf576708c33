"""The job engine end to end: embedded digits (no download) and TFDS image sets under mock data."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, digits_settings
from resmem_jax import fitting
from resmem_jax import settings as settings_lib
from resmem_jax.jobs import engine, report

RESULT_KEYS = {"test_accuracy", "test_error", "test_squared_loss", "test_log_loss",
               "validation_accuracy", "train_accuracy"}


_digits = digits_settings


def _copy_without_memory(workdir, target):
  if not target.exists():  # reuse the trained checkpoint, build a fresh memory
    shutil.copytree(workdir, target, ignore=shutil.ignore_patterns("memory", "results.json"))
  return target


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("digits_run")
  return workdir, engine.run(_digits(), workdir, progress=False)


def test_results_json_schema(digits_run):
  workdir, results = digits_run
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert on_disk["dataset"] == "digits" and on_disk["row"] == "example"
  assert on_disk["num_params"] > 0
  assert on_disk["hparams"]["k"] in (1, 4, 16) and on_disk["hparams"]["temperature"] in (1.0, 2.0)
  assert on_disk["hparams"]["chosen_on"] == "validation"
  assert "knnlm" not in on_disk  # the kNN-LM head is off by default
  for head in ("base", "resmem"):
    assert set(on_disk[head]) >= RESULT_KEYS
    assert on_disk[head]["test_error"] == pytest.approx(1 - on_disk[head]["test_accuracy"])
  assert set(on_disk["memory"]) >= {"backend", "residual_format", "size", "dim", "reused"}
  assert on_disk["memory"]["size"] == on_disk["num_rows"]["train"] == 1293
  assert on_disk["num_rows"]["test"] == 360 and on_disk["num_rows"]["validation"] == 144
  assert on_disk["timing"]["resmem_over_base"] > 0
  assert on_disk["config"]["resmem"]["k_grid"] == [1, 4, 16]
  # The base row is the trained model at T = 1: it matches the training loop's own evaluation.
  assert on_disk["base"]["test_accuracy"] == pytest.approx(on_disk["training"]["test_accuracy"])
  assert "test accuracy" in report.format_table(results)


def test_resmem_memorizes_at_least_as_well_as_the_base(digits_run):
  _, results = digits_run
  assert results["resmem"]["train_accuracy"] >= results["base"]["train_accuracy"]


def test_rerun_reuses_memory_and_gives_same_numbers(digits_run):
  workdir, first = digits_run
  mtimes = {p: p.stat().st_mtime_ns for p in (workdir / "memory").rglob("*") if p.is_file()}
  assert mtimes
  second = engine.run(_digits(), workdir, progress=False)
  assert second["memory"]["reused"] is True
  assert second["hparams"] == first["hparams"]
  for head in ("base", "resmem"):
    assert second[head]["test_accuracy"] == first[head]["test_accuracy"]
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # memory files untouched


@pytest.mark.parametrize("backend", ["exact", "scann", "approx"])
def test_k1_memorizes_training_set_exactly(digits_run, backend):
  """With k = 1 every training point finds itself: ResMem's training accuracy is exactly 100%."""
  workdir, first = digits_run
  sub = _copy_without_memory(workdir, workdir.parent / f"{workdir.name}_k1_{backend}")
  results = engine.run(_digits(backend=backend, k=1, sigma=1.0, temperature=1.0, base_mix=0.5),
                       sub, progress=False)
  assert results["hparams"]["chosen_on"] == "fixed"
  assert results["num_rows"]["validation"] == 0  # nothing to choose: no validation pass
  assert results["resmem"]["train_accuracy"] == 1.0
  assert results["base"]["train_accuracy"] == pytest.approx(first["base"]["train_accuracy"])
  assert results["base"]["train_accuracy"] < 1.0  # so the 100% is the memory's doing


def test_sparse_residual_memory_through_the_engine(digits_run):
  """The sparse top-m format end to end (the ImageNet / LM setting) on the trained digits model."""
  workdir, _ = digits_run
  sub = _copy_without_memory(workdir, workdir.parent / f"{workdir.name}_sparse")
  results = engine.run(_digits(residual_format="sparse", top_m=3, k=1, sigma=1.0,
                               temperature=1.0, base_mix=0.5), sub, progress=False)
  assert results["memory"]["residual_format"] == "sparse" and results["memory"]["top_m"] == 3
  # top-m keeps the true label's entry exactly, so k = 1 still memorizes every training label
  assert results["resmem"]["train_accuracy"] == 1.0


def test_knnlm_head_on_an_image_job(digits_run):
  """resmem.knnlm means the same in every job: the neighbours' labels mixed into p."""
  workdir, first = digits_run
  sub = _copy_without_memory(workdir, workdir.parent / f"{workdir.name}_knn")
  results = engine.run(_digits(knnlm=True, knn_lambda_grid=(0.3, 1.0)), sub, progress=False)
  assert results["hparams"]["knnlm"]["lambda"] in (0.3, 1.0)
  assert set(results["knnlm"]) >= RESULT_KEYS
  assert results["resmem"]["test_accuracy"] == first["resmem"]["test_accuracy"]  # same choice rule
  assert "knnlm" in report.format_table(results)


def test_scann_query_settings_tuned_on_validation(digits_run, tmp_path):
  workdir, _ = digits_run
  sub = _copy_without_memory(workdir, tmp_path / "tuned")
  s = _digits(backend="scann", backend_options="mode=tree_ah,num_leaves=16", tune_recall=0.95)
  results = engine.run(s, sub, progress=False)
  tuning = results["memory"]["search_tuning"]
  assert tuning["met_target"] and tuning["recall"] >= 0.95
  manifest = json.loads((sub / "memory" / "index" / "manifest.json").read_text())
  assert json.dumps(tuning["reorder"]) in json.dumps(manifest)
  assert engine.run(s, sub, progress=False)["memory"]["search_tuning"] == tuning  # reused


def test_tune_recall_on_a_brute_force_memory_fails_before_training(tmp_path):
  with pytest.raises(settings_lib.SettingsError, match="brute force"):
    engine.run(_digits(backend="scann", tune_recall=0.95), tmp_path / "w", progress=False)
  assert not (tmp_path / "w").exists()


def _binary(*flags, workdir):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
      [sys.executable, "-m", "experiments.resmem", "--config=digits:tiny",
       f"--workdir={workdir}", *flags], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
      timeout=300)


# Through the binary for two registries (memory backends, data sets); every other field's check is
# tested in-process in test_settings.py.
@pytest.mark.parametrize("flag,field", [
    ("--config.resmem.backend=faiss", "resmem.backend"),
    ("--config.data.name=svhn", "data.name"),
])
def test_binary_rejects_a_bad_field_before_any_work(tmp_path, flag, field):
  proc = _binary(flag, workdir=tmp_path / "w")
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("config error: ") and field in last, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()  # no checkpoint folder, nothing written


# ----------------------------------------------------------------------------- TFDS under mock data


def _mock_settings(module_name, tmp_path, **data):
  import importlib
  cfg = importlib.import_module(f"resmem_jax.configs.{module_name}").get_config("tiny")
  cfg.data.data_dir = str(tmp_path / "tfds")
  cfg.data.train_fraction = 1.0
  for key, value in data.items():
    cfg.data[key] = value
  cfg.resmem.backend = "exact"
  cfg.resmem.k_grid = (1, 4)
  cfg.resmem.sigma_grid = (0.5, 2.0)
  cfg.resmem.temperature_grid = (1.0,)
  cfg.resmem.eval_batch_size = 16
  cfg.resmem.timing_repeats = 1
  return settings_lib.from_config(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name,shape,classes", [("svhn_cropped", (32, 32, 3), 10),
                                                ("emnist/letters", (28, 28, 1), 37)])
def test_any_tfds_image_classification_set_end_to_end(tmp_path, name, shape, classes):
  """Data sets outside the built-in list, read from the TFDS builder's info."""
  import tensorflow_datasets as tfds
  s = _mock_settings("mnist", tmp_path, name=name, val_fraction=0.25)
  with tfds.testing.mock_data(num_examples=48):
    results = engine.run(s, tmp_path / "run", progress=False)
  assert results["dataset"] == name
  assert results["num_rows"] == {"train": 36, "validation": 12, "test": 48}
  assert results["memory"]["size"] == 36
  residuals = np.load(tmp_path / "run" / "memory" / "index" / "residuals.npy")
  assert residuals.shape == (36, classes)  # one column per class of the TFDS ClassLabel
  assert 0.0 <= results["resmem"]["test_accuracy"] <= 1.0
  model_info = json.loads((tmp_path / "run" / "model_info.json").read_text())
  assert tuple(model_info["input_shape"]) == shape


@pytest.mark.slow
def test_cifar100_paper_config_runs_end_to_end_on_mock_data(tmp_path):
  """The CIFAR-100 config (CIFAR ResNet, augmentation) through train -> memory -> results."""
  import tensorflow_datasets as tfds
  s = _mock_settings("cifar100", tmp_path)
  with tfds.testing.mock_data(num_examples=48):
    results = engine.run(s, tmp_path / "run", progress=False)
  assert results["dataset"] == "cifar100" and results["model"] == "cifar_resnet"
  assert results["num_rows"]["test"] == 48
  assert results["memory"]["size"] == results["num_rows"]["train"] > 0


@pytest.mark.slow
def test_imagenet_paper_config_runs_end_to_end_on_mock_data(tmp_path):
  """The ImageNet config (ResNet, streamed input, sparse residuals) end to end under mock data."""
  import tensorflow_datasets as tfds
  from test_data_tfds import write_metadata
  s = _mock_settings("imagenet", tmp_path, image_size=32, val_fraction=0.2)
  write_metadata(tmp_path / "tfds", "imagenet2012", {"train": 40, "validation": 40})
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(tmp_path / "tfds")):
    results = engine.run(s, tmp_path / "run", progress=False)
  assert results["dataset"] == "imagenet2012"
  assert results["num_rows"]["validation"] > 0 and results["num_rows"]["test"] == 40
  assert results["memory"]["size"] == results["num_rows"]["train"]
  assert results["memory"]["residual_format"] == "sparse"


def test_comparison_is_in_every_result_and_consistent(digits_run):
  _, results = digits_run
  c = results["comparison"]
  assert c["test_accuracy_gain"] == pytest.approx(
      results["resmem"]["test_accuracy"] - results["base"]["test_accuracy"])
  assert c["rows"] == results["num_rows"]["test"]
  assert c["test_accuracy_gain"] == pytest.approx((c["gained"] - c["lost"]) / c["rows"])
  assert c["ci95"][0] <= c["test_accuracy_gain"] <= c["ci95"][1]
  assert 0 < c["p_value"] <= 1 and "McNemar" in c["method"]
  assert "McNemar p =" in report.format_table(results)


def test_probability_output_mix_is_chosen_on_validation_log_loss(digits_run):
  """The mix is one of the grid's; on digits the chosen output beats the base model's validation
  log loss (not guaranteed in general: rows where the base disagrees with ResMem's class keep a
  smaller mix)."""
  _, results = digits_run
  assert results["hparams"]["base_mix"] in settings_lib.ResMemSettings().base_mix_grid
  assert results["resmem"]["validation_log_loss"] <= results["base"]["validation_log_loss"]
  assert np.isfinite(results["resmem"]["test_log_loss"])


def test_resmem_always_memorizes_by_default(digits_run):
  """The paper's rule: the reported ResMem is the memory's prediction, with no gate in between."""
  _, results = digits_run
  assert results["hparams"]["memorize"] is True and results["gate"] == {"enabled": False}
  assert results["timing"]["resmem_query_and_combine_seconds"] > 0
  table = report.format_table(results)
  assert "declined" not in table and "gate" not in table


def test_gate_is_reported_beside_resmem_never_instead(digits_run):
  """With the opt-in gate, ResMem's figures are the same as without it; the gate's decision,
  rule, p-value and held-out gain are a block of their own, and the table says what a gated
  deployment would serve."""
  workdir, first = digits_run
  sub = _copy_without_memory(workdir, workdir.parent / f"{workdir.name}_gate")
  results = engine.run(_digits(gate_alpha=0.05), sub, progress=False)
  for key in ("test_accuracy", "test_log_loss", "train_accuracy"):
    assert results["resmem"][key] == first["resmem"][key]
  assert results["comparison"] == first["comparison"]
  g = results["gate"]
  assert g["enabled"] and g["alpha"] == 0.05 and g["select_by"] == "accuracy"
  assert g["memorize"] == (g["p_value"] <= 0.05) and 0 <= g["p_value"] <= 1
  held = g["held_out"]
  assert held["rows"] == results["num_rows"]["validation"] // 2  # the test half
  assert held["ci95"][0] <= held["gain"] <= held["ci95"][1]
  assert g["comparator"]["temperature"] in (1.0, 2.0)
  table = report.format_table(results)
  assert "gate (opt-in, reported beside ResMem)" in table
  assert ("a gated deployment would serve the base model" in table) == (not g["memorize"])
  # Another alpha is another saved choice (the memory is rebuilt), the same measurement.
  strict = engine.run(_digits(gate_alpha=1e-12), sub, progress=False)
  assert strict["memory"]["reused"] is False
  assert strict["gate"]["p_value"] == g["p_value"] and strict["gate"]["memorize"] is False
  assert strict["resmem"]["test_accuracy"] == first["resmem"]["test_accuracy"]


def test_probability_output_agrees_with_resmem_class_on_every_row(digits_run):
  """The class of ResMem's probability output is ResMem's class, argmax(p + r), on every test
  row (what a scikit-learn user expects of predict_proba)."""
  workdir, first = digits_run
  settings = _digits()
  _, _, passes = engine.trained_passes(settings, workdir, progress=False)
  memory, choice, _ = fitting.build_and_select(settings.resmem, passes, "digits")
  assert choice.resmem.k == first["hparams"]["k"]
  rows = 0
  for chunk in passes.rows("test", passes.forward(with_logits=True)):
    _, scores, probabilities, _ = fitting.predict_rows(memory, choice, chunk)
    np.testing.assert_array_equal(np.argmax(probabilities, -1), np.argmax(scores, -1))
    assert np.allclose(np.sum(probabilities, -1), 1.0, atol=1e-5)
    rows += chunk.size
  assert rows == first["num_rows"]["test"]


@pytest.mark.slow
def test_model_size_sweep_keeps_every_seed_and_plots_the_spread(tmp_path, monkeypatch):
  from resmem_jax.jobs import sweeps
  s = _digits()
  out = sweeps.model_size_sweep(s, tmp_path, "model.width", [8, 16], seeds=2, progress=False)
  assert [row["model.width"] for row in out["variants"]] == [8, 16]
  for row in out["variants"]:
    seeds = row["seeds"]
    assert [r["seed"] for r in seeds] == [0, 1]
    gains = [r["gain_test_accuracy"] for r in seeds]
    assert row["gain_test_accuracy"]["mean"] == pytest.approx(np.mean(gains))
    assert row["gain_test_accuracy"]["std"] == pytest.approx(np.std(gains, ddof=1))
    assert (tmp_path / f"width_{row['model.width']}" / "seed_1" / "results.json").exists()
  # Different seeds train different models.
  assert out["variants"][0]["seeds"][0]["base"] != out["variants"][0]["seeds"][1]["base"]
  trend = out["trend"]  # the gain against log10(parameters), every run a point
  from scipy import stats
  xs = [np.log10(row["num_params"]) for row in out["variants"] for _ in row["seeds"]]
  ys = [100 * s["gain_test_accuracy"] for row in out["variants"] for s in row["seeds"]]
  fit = stats.linregress(xs, ys)
  assert trend["slope_points_per_decade"] == pytest.approx(fit.slope)
  assert trend["p_value"] == pytest.approx(fit.pvalue) and trend["runs"] == 4
  assert trend["ci95"][0] < fit.slope < trend["ci95"][1]
  assert "trend of the gain over the whole range" in report.format_sweep(out, "model.width")
  png = (tmp_path / "model_size_sweep.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
  assert "+- std" in report.format_sweep(out, "model.width")
  # The selection study reuses the sweep's models and reads no test row.
  from resmem_jax.jobs import selection_study
  rows = fitting.Passes.rows

  def no_test(self, split, *args, **kwargs):
    assert split != "test", "the selection study read the test split"
    return rows(self, split, *args, **kwargs)

  monkeypatch.setattr(fitting.Passes, "rows", no_test)
  study = selection_study.run_study(s, tmp_path, "model.width", [8, 16], seeds=2,
                                    grids={"T = 1": (1.0,), "T in 1-2": (1.0, 2.0)},
                                    criteria=("squared_loss", "accuracy"))
  assert len(study["runs"]) == 4 and len(study["summary"]) == 4
  for run in study["runs"]:
    assert all(c["temperature"] == 1.0 for c in run["rules"]["accuracy, T = 1"]["chosen"])
    assert run["validation_rows"] == 144
  leader = max(study["summary"], key=lambda row: row["accuracy_gain"]["mean"])
  assert leader["accuracy_gain_minus_leader"]["mean"] == 0
  assert (tmp_path / "selection_study.json").exists()
  assert "held-out val. acc. gain" in selection_study.format_study(study)
