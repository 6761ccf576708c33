"""Language modelling: the Transformer's causality, the LM math against NumPy, the per-token memory.

Pure-math and model tests run anywhere; tests that read the real tiny_shakespeare archive skip when
../shared/datasets is absent.
"""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import shared_dataset_dir
from resmem_jax import lm
from resmem_jax import metrics
from resmem_jax.models import transformer


def _model_cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(name="transformer", width=32, depth=2, num_heads=4,
                                       max_len=16, mlp_ratio=2, dropout_rate=0.0))
  cfg.update(overrides)
  return cfg


# ----------------------------------------------------------------------------- the model


def test_causal_masking_changes_nothing_before_t():
  module = transformer.build(_model_cfg(), num_classes=11)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 11)
  variables = module.init(jax.random.key(1), tokens)
  logits, hidden = module.apply(variables, tokens)
  assert logits.shape == (2, 16, 11) and hidden.shape == (2, 16, 32)
  for t in (0, 5, 15):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 11)
    logits2, hidden2 = module.apply(variables, changed)
    np.testing.assert_array_equal(np.asarray(logits2[:, :t]), np.asarray(logits[:, :t]))
    np.testing.assert_array_equal(np.asarray(hidden2[:, :t]), np.asarray(hidden[:, :t]))
    # ...while position t itself does see the change.
    assert not np.allclose(np.asarray(logits2[:, t]), np.asarray(logits[:, t]))


def test_build_model_registry_and_bad_config():
  from resmem_jax import models
  module = models.build_model(_model_cfg(), 7)
  assert isinstance(module, transformer.TransformerLM) and module.vocab_size == 7
  with pytest.raises(ValueError, match="num_heads"):
    transformer.build(_model_cfg(width=30), 7)
  with pytest.raises(ValueError, match="max_len"):
    module.init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32))


# ----------------------------------------------------------------------------- pure math


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_sparse_residuals_match_numpy_and_memory_store():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 9)).astype(np.float32) * 3
  targets = rng.integers(0, 9, size=50).astype(np.int32)
  columns, values = map(np.asarray, lm.sparse_residuals(logits, targets, 2.0, top_m=3))
  assert columns.shape == values.shape == (50, 4)
  dense_ref = np.eye(9, dtype=np.float32)[targets] - _np_softmax(logits / 2.0)
  for i in range(50):
    assert columns[i, 0] == targets[i]
    others = [j for j in np.argsort(dense_ref[i]) if j != targets[i]][:3]  # most negative
    assert set(columns[i, 1:]) == set(others)
    np.testing.assert_allclose(values[i], dense_ref[i, columns[i]], rtol=1e-5, atol=1e-6)
  # The same entries the memory keeps for residual_format="sparse".
  from resmem_jax.memory import storage
  store = storage.SparseStore(dense_ref, top_m=3)
  np.testing.assert_allclose(store.gather(np.arange(50)),
                             np.asarray(lm.scatter_rows(jnp.asarray(columns), jnp.asarray(values), 9)),
                             atol=1e-6)


def test_knn_distribution_and_interpolation_match_numpy():
  weights = np.array([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]], np.float32)
  nb_targets = np.array([[2, 0, 2], [1, 1, 3]], np.int32)
  p_knn = np.asarray(lm.knn_distribution(weights, nb_targets, 4))
  np.testing.assert_allclose(p_knn, [[0.3, 0, 0.7, 0], [0, 1, 0, 0]], atol=1e-7)
  p_lm = np.full((2, 4), 0.25, np.float32)
  np.testing.assert_allclose(np.asarray(lm.interpolate(p_knn, p_lm, 0.2)),
                             0.2 * p_knn + 0.8 * p_lm, atol=1e-7)


def _random_train_tokens(rng, n, dim, vocab, temperatures, top_m):
  logits = rng.normal(size=(n, vocab)).astype(np.float32) * 2
  targets = rng.integers(0, vocab, size=n).astype(np.int32)
  sparse = [tuple(map(np.asarray, lm.sparse_residuals(logits, targets, t, top_m)))
            for t in temperatures]
  return lm.TrainTokens(hidden=rng.normal(size=(n, dim)).astype(np.float32), targets=targets,
                        temperatures=tuple(temperatures), sparse=sparse, num_classes=vocab), logits


def test_validation_sweep_matches_numpy_reference():
  rng = np.random.default_rng(1)
  vocab, top_m, temps = 6, 5, (0.5, 1.0)  # top_m = vocab - 1: the sparse form is exact
  train, train_logits = _random_train_tokens(rng, 40, 3, vocab, temps, top_m)
  q = 13
  val = lm.TokenOutputs(hidden=rng.normal(size=(q, 3)).astype(np.float32),
                        logits=rng.normal(size=(q, vocab)).astype(np.float32),
                        targets=rng.integers(0, vocab, size=q).astype(np.int32), sparse=[])
  d_all = np.linalg.norm(val.hidden[:, None] - train.hidden[None], axis=-1)
  indices = np.argsort(d_all, axis=1)[:, :4]
  distances = np.take_along_axis(d_all, indices, 1).astype(np.float32)
  sweep = lm.ValidationSweep(train, k_grid=(1, 4), sigma_grid=(0.3, 2.0), temperature_grid=temps,
                             lambda_grid=(0.25, 1.0))
  sweep.chunk = 8  # two chunks, the second padded
  sweep.add(val, distances, indices)
  res, knn = sweep.choices()
  assert len(res) == 2 * 2 * 2 and len(knn) == 2 * 2 * 2 * 2

  def floor_log_loss(pred):
    probs = np.maximum(pred, metrics.LOG_LOSS_FLOOR)
    probs = probs / probs.sum(-1, keepdims=True)
    return float(np.mean(-np.log(probs[np.arange(q), val.targets])))

  onehot = np.eye(vocab)
  for c in res + knn:
    d, idx = distances[:, :c.k], indices[:, :c.k]
    w = _np_softmax(-d / c.sigma)
    p = _np_softmax(val.logits / c.temperature)
    if c.knn_lambda is None:
      r = onehot[train.targets] - _np_softmax(train_logits / c.temperature)
      pred = p + np.einsum("qk,qkc->qc", w, r[idx])
    else:
      p_knn = np.einsum("qk,qkc->qc", w, onehot[train.targets[idx]])
      pred = c.knn_lambda * p_knn + (1 - c.knn_lambda) * p
    assert c.accuracy == pytest.approx(np.mean(pred.argmax(-1) == val.targets), abs=1e-6)
    assert c.log_loss == pytest.approx(floor_log_loss(pred), rel=1e-4)
  base = sweep.base_scores()
  assert base["log_loss"] == pytest.approx(floor_log_loss(_np_softmax(val.logits)), rel=1e-4)
  best = lm.select(res, "accuracy")
  assert best.accuracy == max(c.accuracy for c in res)
  with pytest.raises(ValueError, match="select_by"):
    lm.select(res, "perplexity")
  with pytest.raises(ValueError, match="knn_lambda_grid"):
    lm.ValidationSweep(train, (1,), (1.0,), temps, (1.5,))


# ----------------------------------------------------------------------------- data + memory


def _data_cfg(tmp_path, **overrides):
  manual = shared_dataset_dir("tiny_shakespeare")
  cfg = dict(name="tiny_shakespeare", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual),
             seq_len=16, max_split_tokens=3000)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def test_text_batches_cover_every_target_once_and_resume(tmp_path):
  from resmem_jax.data import text
  cfg = _data_cfg(tmp_path)
  info = text.dataset_info(cfg)
  assert info.num_classes == 66 and info.input_shape == (16,)
  stream = np.concatenate(list(text._documents(cfg, "test")))
  assert len(stream) == 3000
  batches = list(text.eval_batches(cfg, "test", 24))
  targets = np.concatenate([b["targets"][b["mask"] == 1] for b in batches])
  inputs = np.concatenate([b["inputs"][b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(targets, stream[1:])
  np.testing.assert_array_equal(inputs, stream[:-1])
  assert sum(len(b["mask"]) for b in batches) >= info.split_sizes["test"] == -(-2999 // 16)
  fresh = text.train_batches(cfg, 4, seed=3)
  first = [next(fresh) for _ in range(3)]
  resumed = next(text.train_batches(cfg, 4, seed=3, start_step=2))
  for key in ("inputs", "targets", "mask"):
    np.testing.assert_array_equal(resumed[key], first[2][key])
  np.testing.assert_array_equal(first[0]["inputs"][:, 1:], first[0]["targets"][:, :-1])
  assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
  with pytest.raises(ValueError, match="split"):
    next(text.eval_batches(cfg, "dev", 4))


def test_memory_holds_one_entry_per_training_token(tmp_path):
  from resmem_jax import mesh as mesh_lib
  from resmem_jax.data import text
  cfg = _data_cfg(tmp_path, max_split_tokens=2500)
  module = transformer.build(_model_cfg(), num_classes=text.dataset_info(cfg).num_classes)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
  mesh = mesh_lib.data_mesh()
  forward = lm.make_token_forward(module, (1.0, 2.0), top_m=4, with_logits=False)
  train = lm.collect_train_tokens(forward, variables, text.eval_batches(cfg, "train", 32), mesh,
                                  (1.0, 2.0), 66)
  assert train.hidden.shape == (2499, 32) and train.sparse[1][0].shape == (2499, 5)
  stream = np.concatenate(list(text._documents(cfg, "train")))
  np.testing.assert_array_equal(train.targets, stream[1:])
  memory = lm.build_token_memory(train, 2.0, backend="exact", top_m=4, max_dense_elements=70000)
  assert memory.size == 2499 == len(stream) - 1  # built in chunks through Memory.add
  # Entry i is training token i: its own key finds itself, with its own residual.
  distances, indices = memory.search(train.hidden[:50], 1)
  np.testing.assert_array_equal(np.asarray(indices)[:, 0], np.arange(50))
  np.testing.assert_allclose(memory.gather_residuals(np.arange(50)[:, None])[:, 0],
                             train.dense_residuals(2.0, slice(0, 50)), atol=1e-6)
  # Another temperature: same keys and index, residuals recomputed chunk by chunk.
  cooled = lm.retemper_token_memory(memory, train, 1.0, max_dense_elements=70000)
  assert cooled.size == 2499
  np.testing.assert_allclose(cooled.gather_residuals(np.arange(2499)),
                             train.dense_residuals(1.0, slice(0, 2499)), atol=1e-6)


def test_tiny_end_to_end_run(tmp_path):
  from experiments.configs import tiny_shakespeare
  manual = shared_dataset_dir("tiny_shakespeare")
  config = tiny_shakespeare.get_config("tiny")
  config.data.manual_dir = str(manual)
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.max_split_tokens = 4000
  config.train.num_steps = 12
  results = lm.run(config, tmp_path / "work")
  saved = json.loads((tmp_path / "work" / "results.json").read_text())
  assert saved["memory"]["entries"] == saved["memory"]["train_tokens"] == 3999
  assert saved["num_test_tokens"] == 3999
  for name in ("base", "resmem", "knnlm"):
    assert 0.0 <= saved[name]["test_accuracy"] <= 1.0
    assert np.isfinite(saved[name]["test_log_loss"]) and saved[name]["test_log_loss"] > 0
  assert saved["hparams"]["resmem"]["k"] in (1, 4)
  assert saved["hparams"]["knnlm"]["lambda"] in (0.1, 0.5)
  assert saved["base"]["test_accuracy"] == pytest.approx(saved["model"]["test_accuracy"], abs=1e-6)
  assert "resmem" in lm.format_table(results)


@pytest.mark.parametrize("config_module", ["lm1b", "c4"])
def test_subword_datasets_on_mock_data(tmp_path, config_module):
  import importlib
  import tensorflow_datasets as tfds
  from resmem_jax.data import text
  cfg = importlib.import_module(f"experiments.configs.{config_module}").get_config("tiny").data
  cfg.data_dir = str(tmp_path / "tfds")
  with tfds.testing.mock_data(num_examples=12):
    info = text.dataset_info(cfg)
    assert info.name == config_module and 256 <= info.num_classes <= 400
    assert list((tmp_path / "tfds" / "resmem_vocab").glob("*.subwords"))  # saved for reuse
    docs = list(text._documents(cfg, "test"))
    assert all(d[0] == text.DOCUMENT_START for d in docs)
    batches = list(text.eval_batches(cfg, "test", 8))
    targets = np.concatenate([b["targets"][b["mask"] == 1] for b in batches])
    np.testing.assert_array_equal(targets, np.concatenate([d[1:] for d in docs]))
    first = [next(text.train_batches(cfg, 4, seed=1)) for _ in range(1)][0]
    stream = text.train_batches(cfg, 4, seed=1)
    batches3 = [next(stream) for _ in range(3)]
    np.testing.assert_array_equal(batches3[0]["inputs"], first["inputs"])
    resumed = next(text.train_batches(cfg, 4, seed=1, start_step=2))
    np.testing.assert_array_equal(resumed["targets"], batches3[2]["targets"])
    assert resumed["inputs"].shape == (4, 16) and resumed["inputs"].dtype == np.int32


def test_token_pass_on_eight_devices_matches_one():
  from conftest import run_python
  code = r'''
import jax, jax.numpy as jnp, numpy as np, ml_collections
from resmem_jax import lm, mesh as mesh_lib
from resmem_jax.models import transformer
assert jax.device_count() == 8
cfg = ml_collections.ConfigDict(dict(width=16, depth=1, num_heads=2, max_len=8))
module = transformer.build(cfg, 9)
variables = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
rng = np.random.default_rng(0)
tokens = rng.integers(0, 9, size=(16, 9)).astype(np.int32)
mask = np.ones((16, 8), np.int32); mask[13:] = 0; mask[12, 5:] = 0
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
outs = []
for devices in (jax.devices()[:1], jax.devices()):
  mesh = mesh_lib.data_mesh(devices)
  fwd = lm.make_token_forward(module, (1.0,), top_m=3, with_logits=True)
  out, = list(lm.token_pass(fwd, mesh_lib.replicate(variables, mesh), iter([batch]), mesh))
  outs.append(out)
assert len(outs[1].targets) == int(mask.sum()) == 12 * 8 + 5
np.testing.assert_array_equal(outs[0].targets, outs[1].targets)
np.testing.assert_allclose(outs[0].hidden, outs[1].hidden, atol=1e-5)
np.testing.assert_allclose(outs[0].logits, outs[1].logits, atol=1e-5)
np.testing.assert_array_equal(outs[0].sparse[0][0], outs[1].sparse[0][0])
print("ok")
'''
  assert "ok" in run_python(code, devices=8).stdout
