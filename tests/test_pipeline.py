"""The main job end to end on the embedded digits data (no download), tiny config."""
import json

import numpy as np
import pytest

from conftest import run_python

RESULT_KEYS = {"test_accuracy", "test_error", "test_squared_loss", "train_accuracy"}


def _tiny_config(**resmem):
  from experiments.configs import digits
  cfg = digits.get_config("tiny")
  cfg.resmem.backend = resmem.pop("backend", "exact")
  cfg.resmem.k_grid = (1, 4, 16)
  cfg.resmem.sigma_grid = (0.1, 1.0, 10.0)
  cfg.resmem.temperature_grid = (1.0, 2.0)
  for key, value in resmem.items():
    cfg.resmem[key] = value
  return cfg


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  from resmem_jax import pipeline
  workdir = tmp_path_factory.mktemp("digits_run")
  results = pipeline.run(_tiny_config(), workdir, progress=False)
  return workdir, results


def test_results_json_schema(digits_run):
  workdir, results = digits_run
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  for key in ("dataset", "model", "num_params", "hparams", "base", "resmem"):
    assert key in on_disk
  assert on_disk["dataset"] == "digits"
  assert on_disk["num_params"] > 0
  assert set(on_disk["hparams"]) >= {"k", "sigma", "temperature"}
  assert on_disk["hparams"]["k"] in (1, 4, 16)
  for model in ("base", "resmem"):
    assert set(on_disk[model]) >= RESULT_KEYS
    assert on_disk[model]["test_error"] == pytest.approx(1 - on_disk[model]["test_accuracy"])
  # digits test split: every example evaluated exactly once
  from resmem_jax import data
  from experiments.configs import digits
  n_test = data.num_examples(digits.get_config("tiny").data, "test")
  assert on_disk["num_examples"]["test"] == n_test


def test_resmem_not_worse_than_base_on_validation_choice(digits_run):
  _, results = digits_run
  # k, sigma, T are chosen on validation; the chosen point is at least as good there as the
  # grid's memory-free limit, and ResMem's training accuracy beats the base model's.
  assert results["resmem"]["train_accuracy"] >= results["base"]["train_accuracy"]
  assert results["hparams"]["chosen_on"] == "validation"


def test_rerun_reuses_memory_and_gives_same_numbers(digits_run):
  from resmem_jax import pipeline
  workdir, first = digits_run
  index_files = sorted(p.name for p in (workdir / "memory").rglob("*") if p.is_file())
  mtimes = {p: p.stat().st_mtime_ns for p in (workdir / "memory").rglob("*") if p.is_file()}
  second = pipeline.run(_tiny_config(), workdir, progress=False)
  assert second["memory"]["reused"] is True
  assert second["hparams"]["k"] == first["hparams"]["k"]
  assert second["resmem"]["test_accuracy"] == pytest.approx(first["resmem"]["test_accuracy"])
  assert second["base"]["test_accuracy"] == pytest.approx(first["base"]["test_accuracy"])
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # memory files untouched
  assert index_files


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_k1_memorizes_training_set_exactly(digits_run, backend):
  """With k = 1 every training point finds itself: ResMem's training accuracy is exactly 100%."""
  import shutil
  from resmem_jax import pipeline
  workdir, first = digits_run
  sub = workdir.parent / f"{workdir.name}_k1_{backend}"
  if not sub.exists():  # reuse the trained checkpoint, build a fresh k=1 memory
    shutil.copytree(workdir, sub, ignore=shutil.ignore_patterns("memory", "results.json"))
  cfg = _tiny_config(backend=backend, k=1, sigma=1.0, temperature=1.0)
  results = pipeline.run(cfg, sub, progress=False)
  assert results["hparams"]["chosen_on"] == "fixed"
  assert results["resmem"]["train_accuracy"] == 1.0
  assert results["base"]["train_accuracy"] == pytest.approx(first["base"]["train_accuracy"])
  assert results["base"]["train_accuracy"] < 1.0  # so the 100% is the memory's doing


def test_scann_query_settings_tuned_on_validation(digits_run, tmp_path):
  import shutil
  from resmem_jax import pipeline
  workdir, _ = digits_run
  sub = tmp_path / "tuned"
  shutil.copytree(workdir, sub, ignore=shutil.ignore_patterns("memory", "results.json"))
  cfg = _tiny_config(backend="scann", backend_options="mode=tree_ah,num_leaves=16",
                     tune_recall=0.95)
  results = pipeline.run(cfg, sub, progress=False)
  tuning = results["memory"]["search_tuning"]
  assert tuning["met_target"] and tuning["recall"] >= 0.95
  manifest = json.loads((sub / "memory" / "index" / "manifest.json").read_text())
  assert manifest["scann"]["options"]["reorder"] == tuning["reorder"]
  assert pipeline.run(cfg, sub, progress=False)["memory"]["search_tuning"] == tuning  # reused
  shutil.rmtree(sub / "memory")
  with pytest.raises(ValueError, match="brute force"):
    pipeline.run(_tiny_config(backend="scann", tune_recall=0.95), sub, progress=False)
  with pytest.raises(ValueError, match="backend"):
    pipeline.run(_tiny_config(backend="exact", tune_recall=0.95), sub, progress=False)
  assert not (sub / "memory").exists()  # both failed before building anything


def test_embedding_pass_exactly_once_on_8_devices():
  # 8 fake devices, a split size that is not a multiple of the batch (or of 8): the pass returns
  # each example once, in order, equal to a direct forward pass on the unpadded data.
  code = r'''
import numpy as np, jax
from experiments.configs import digits
from resmem_jax import data, embed, mesh as mesh_lib, models
assert jax.device_count() == 8
cfg = digits.get_config("tiny")
info = data.dataset_info(cfg.data)
module = models.build_model(cfg.model, info.num_classes)
x0 = np.zeros((1,) + tuple(info.input_shape), np.float32)
variables = module.init(jax.random.PRNGKey(0), x0, train=False)
m = mesh_lib.data_mesh()
n = data.num_examples(cfg.data, "test")
batch = 56  # multiple of 8 devices, not a divisor of n
assert n % batch != 0
out = embed.embed_split(module, variables, cfg.data, "test", batch, m, progress=False)
assert out.size == n, (out.size, n)
images = np.concatenate([b["image"][np.asarray(b["mask"], bool)]
                         for b in data.eval_batches(cfg.data, "test", batch)])
labels = np.concatenate([b["label"][np.asarray(b["mask"], bool)]
                         for b in data.eval_batches(cfg.data, "test", batch)])
assert images.shape[0] == n
ref_logits, ref_emb = module.apply(variables, images, train=False)
np.testing.assert_allclose(out.logits, np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(out.embeddings, np.asarray(ref_emb), rtol=1e-5, atol=1e-5)
np.testing.assert_array_equal(out.labels, labels)
print("OK", n)
'''
  proc = run_python(code, devices=8)
  assert "OK" in proc.stdout


def _mock_pipeline_config(module_name, tmp_path):
  import importlib
  cfg = importlib.import_module(f"experiments.configs.{module_name}").get_config("tiny")
  cfg.data.data_dir = str(tmp_path / "tfds")
  cfg.data.train_fraction = 1.0
  cfg.resmem.backend = "exact"
  cfg.resmem.k_grid = (1, 4)
  cfg.resmem.sigma_grid = (0.5, 2.0)
  cfg.resmem.temperature_grid = (1.0,)
  cfg.resmem.eval_batch_size = 16
  return cfg


def test_cifar100_paper_config_runs_end_to_end_on_mock_data(tmp_path):
  """The CIFAR-100 config (CIFAR ResNet) through train -> embed -> memory -> results."""
  import tensorflow_datasets as tfds
  from resmem_jax import pipeline
  cfg = _mock_pipeline_config("cifar100", tmp_path)
  with tfds.testing.mock_data(num_examples=48):
    results = pipeline.run(cfg, tmp_path / "run", progress=False)
  assert results["dataset"] == "cifar100" and results["model"] == "cifar_resnet"
  assert results["num_examples"]["test"] == 48
  assert results["memory"]["size"] == results["num_examples"]["train"] > 0
  assert 0.0 <= results["resmem"]["test_accuracy"] <= 1.0


def test_imagenet_paper_config_runs_end_to_end_on_mock_data(tmp_path):
  """The ImageNet config (ResNet, streamed input) end to end under mock data."""
  import tensorflow_datasets as tfds
  from resmem_jax import pipeline
  from test_data_tfds import write_imagenet_metadata
  cfg = _mock_pipeline_config("imagenet", tmp_path)
  cfg.data.image_size = 32
  cfg.data.val_fraction = 0.2
  write_imagenet_metadata(tmp_path / "tfds", train=40, validation=24)
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(tmp_path / "tfds")):
    results = pipeline.run(cfg, tmp_path / "run", progress=False)
  assert results["dataset"] == "imagenet2012"
  assert results["num_examples"]["validation"] > 0 and results["num_examples"]["test"] > 0
  assert results["memory"]["size"] == results["num_examples"]["train"]


def test_backend_options_parse_and_reject_garbage():
  from resmem_jax import pipeline
  assert pipeline.parse_backend_options("mode=tree_ah, num_leaves=235,quantization_threshold=0.2") == {
      "mode": "tree_ah", "num_leaves": 235, "quantization_threshold": 0.2}
  assert pipeline.parse_backend_options("") == {}
  with pytest.raises(ValueError, match="key=value"):
    pipeline.parse_backend_options("tree_ah")


def test_sparse_residual_memory_through_the_pipeline(digits_run):
  """The sparse top-m format end to end (the ImageNet/LM setting) on the trained digits model."""
  import shutil
  from resmem_jax import pipeline
  workdir, first = digits_run
  sub = workdir.parent / f"{workdir.name}_sparse"
  if not sub.exists():
    shutil.copytree(workdir, sub, ignore=shutil.ignore_patterns("memory", "results.json"))
  cfg = _tiny_config(residual_format="sparse", top_m=3, k=1, sigma=1.0, temperature=1.0)
  results = pipeline.run(cfg, sub, progress=False)
  assert results["memory"]["residual_format"] == "sparse"
  # top-m keeps the true label's entry exactly, so k = 1 still memorizes every training label
  assert results["resmem"]["train_accuracy"] == 1.0


def test_corrupt_saved_memory_gives_a_clear_error(digits_run):
  import shutil
  from resmem_jax import pipeline
  workdir, _ = digits_run
  sub = workdir.parent / f"{workdir.name}_corrupt"
  shutil.copytree(workdir, sub)
  keys = sub / "memory" / "index" / "keys.npy"
  keys.write_bytes(keys.read_bytes()[:100])
  with pytest.raises(ValueError, match="delete .*memory to rebuild"):
    pipeline.run(_tiny_config(), sub, progress=False)
