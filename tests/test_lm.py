"""Language modelling through the one engine: a memory row per training token, kNN-LM beside ResMem.

The mock-data run works anywhere; the real tiny_shakespeare runs skip when ../shared is absent.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, shared_dataset_dir
from resmem_jax import settings as settings_lib
from resmem_jax.jobs import engine, report
from resmem_jax.models import transformer


def test_causal_masking_changes_nothing_before_t():
  module = transformer.build(settings_lib.ModelSettings(name="transformer", width=32, depth=2,
                                                        num_heads=4, max_len=16, mlp_ratio=2),
                             11, jnp.float32)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 11)
  variables = module.init(jax.random.key(1), tokens)
  logits, hidden = module.apply(variables, tokens)
  assert logits.shape == (2, 16, 11) and hidden.shape == (2, 16, 32)
  for t in (0, 5, 15):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 11)
    logits2, hidden2 = module.apply(variables, changed)
    np.testing.assert_array_equal(np.asarray(logits2[:, :t]), np.asarray(logits[:, :t]))
    np.testing.assert_array_equal(np.asarray(hidden2[:, :t]), np.asarray(hidden[:, :t]))
    assert not np.allclose(np.asarray(logits2[:, t]), np.asarray(logits[:, t]))


def _check_lm_results(results, workdir):
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  assert saved["row"] == "token" and saved["memory"]["residual_format"] == "sparse"
  for head in ("base", "resmem", "knnlm"):
    assert 0.0 <= saved[head]["test_accuracy"] <= 1.0
    assert np.isfinite(saved[head]["test_log_loss"]) and saved[head]["test_log_loss"] > 0
    assert saved[head]["test_perplexity"] == pytest.approx(np.exp(saved[head]["test_log_loss"]))
  # The base row is the trained LM itself: its next-token accuracy is the training loop's.
  assert saved["base"]["test_accuracy"] == pytest.approx(saved["training"]["test_accuracy"],
                                                         abs=1e-6)
  assert "perplexity" in report.format_table(results)
  return saved


@pytest.mark.slow
def test_subword_lm_end_to_end_on_mock_data(tmp_path):
  """lm1b's tiny config through the engine under TFDS mock data (runs without ../shared)."""
  import tensorflow_datasets as tfds
  from resmem_jax.configs import lm1b
  cfg = lm1b.get_config("tiny")
  cfg.data.data_dir = str(tmp_path / "tfds")
  cfg.resmem.gate_alpha = 0.05
  s = settings_lib.from_config(cfg)
  with tfds.testing.mock_data(num_examples=12):
    results = engine.run(s, tmp_path / "work", progress=False)
  saved = _check_lm_results(results, tmp_path / "work")
  assert saved["hparams"]["k"] in (1, 4) and saved["hparams"]["knnlm"]["lambda"] in (0.1, 0.5)
  assert saved["num_rows"]["train"] == saved["memory"]["size"] > 0
  # The gate's folds and test units are whole sequences of tokens, not single tokens.
  held = saved["gate"]["held_out"]
  assert held["units"] == -(-held["rows"] // s.data.seq_len) and "t-test" in held["test"]


def _tiny_shakespeare_command(workdir, tfds_dir, *flags):
  manual = shared_dataset_dir("tiny_shakespeare")
  return [sys.executable, "-m", "experiments.resmem_lm",
          "--config=tiny_shakespeare:tiny", f"--workdir={workdir}",
          f"--config.data.manual_dir={manual}", f"--config.data.data_dir={tfds_dir}",
          "--config.data.max_split_tokens=4000", "--config.train.num_steps=12", *flags]


@pytest.mark.slow
def test_fixed_hyperparameters_are_recorded_exactly(tmp_path):
  """The issue's must-show: scann backend and fixed k / sigma / T reach results.json unchanged."""
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  env.pop("XLA_FLAGS", None)
  command = _tiny_shakespeare_command(
      tmp_path / "work", tmp_path / "tfds", "--config.resmem.backend=scann",
      "--config.resmem.k=4", "--config.resmem.sigma=0.5", "--config.resmem.temperature=1.0")
  proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads((tmp_path / "work" / "results.json").read_text())
  assert saved["memory"]["backend"] == "scann"
  assert (saved["hparams"]["k"], saved["hparams"]["sigma"], saved["hparams"]["temperature"]) == (
      4, 0.5, 1.0)
  assert saved["hparams"]["chosen_on"] == "fixed"
  # kNN-LM shares the fixed neighbours and weights; only its lambda is chosen on validation.
  knn = saved["hparams"]["knnlm"]
  assert (knn["k"], knn["sigma"], knn["temperature"]) == (4, 0.5, 1.0) and knn["lambda"] in (0.1, 0.5)
  assert saved["config"]["resmem"]["backend"] == "scann"
  assert saved["num_rows"]["train"] == saved["memory"]["size"] == 3999  # one row per target token
  assert "kNN-LM" in proc.stdout


@pytest.mark.slow
def test_memory_row_i_is_training_token_i(tmp_path):
  """Every training target token is one memory entry, in order, memorizing its own next token."""
  from resmem_jax.configs import tiny_shakespeare
  from resmem_jax import data, memory
  cfg = tiny_shakespeare.get_config("tiny")
  cfg.data.manual_dir = str(shared_dataset_dir("tiny_shakespeare"))
  cfg.data.data_dir = str(tmp_path / "tfds")
  cfg.data.max_split_tokens = 3000
  cfg.train.num_steps = 4
  cfg.resmem.backend = "approx"  # the on-device backend in the token job (exact elsewhere here)
  s = settings_lib.from_config(cfg)
  results = engine.run(s, tmp_path / "work", progress=False)
  _check_lm_results(results, tmp_path / "work")
  saved = memory.load_memory(tmp_path / "work" / "memory" / "index")
  assert saved.backend == "approx"
  dataset = data.get_dataset(s.data)
  targets = np.concatenate([b["labels"][b["mask"]] for b in dataset.eval_batches("train", 8)])
  assert saved.size == len(targets) == 2999
  np.testing.assert_array_equal(saved.labels, targets)
  # Entry i's key finds itself, and its stored residual's label column is its own next token.
  distances, ids = saved.search(saved.keys[:50], 1)
  np.testing.assert_array_equal(ids[:, 0], np.arange(50))
  np.testing.assert_array_equal(distances[:, 0], 0.0)
  values, columns = saved.residual_rows(np.arange(50))
  np.testing.assert_array_equal(columns[:, 0], targets[:50])
