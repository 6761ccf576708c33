"""resmem_jax.fit on the models Flax users write: an NNX module with RNG streams and dropout, a
Linen module with a train argument and batch statistics, a plain function; one-line errors for a
model that returns the wrong thing and for a mistyped keyword; variables digests unchanged."""
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resmem_jax
from resmem_jax import api
from resmem_jax.training import provenance

# k, sigma, T and the probability mix fixed: nothing is chosen, so no validation split is needed
# and the predictions can be recomputed with the array-level API.
_FIXED = dict(k=4, sigma=0.5, temperature=1.0, base_mix=0.0, progress=False)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(6, 6)).astype(np.float32) * 2
  cluster = rng.integers(0, 6, 120)
  x = (centres[cluster] + 0.3 * rng.normal(size=(120, 6))).astype(np.float32)
  y = (cluster % 3).astype(np.int32)
  return {"train": (x[:80], y[:80]), "test": (x[80:], y[80:])}


def _direct_scores(train_out, y_train, test_out):
  """ResMem's ``p + r`` from the model's own (logits, embedding), through the array-level API."""
  (train_logits, train_emb), (test_logits, test_emb) = train_out, test_out
  r = resmem_jax.residuals(y_train, np.asarray(train_logits), temperature=1.0)
  memory = resmem_jax.build_memory(np.asarray(train_emb), r, backend="exact")
  base = np.asarray(jax.nn.softmax(jnp.asarray(test_logits), axis=-1))
  return resmem_jax.predict(memory, base, np.asarray(test_emb), k=_FIXED["k"],
                            sigma=_FIXED["sigma"])


def _check_fit(fitted, data, direct, tmp_path, model, variables=None):
  """Predictions, evaluation and a save/load round trip against the model's direct outputs."""
  (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
  expected = _direct_scores(direct(x_train), y_train, direct(x_test))
  np.testing.assert_allclose(fitted.predict_scores(x_test), expected, atol=1e-5)
  classes = fitted.predict(x_test)
  np.testing.assert_array_equal(classes, np.argmax(expected, -1))
  np.testing.assert_array_equal(fitted.predict(x_test), classes)  # deterministic across calls
  report = fitted.evaluate(x_test, y_test)
  base_classes = np.argmax(np.asarray(direct(x_test)[0]), -1)
  assert report["base"]["test_accuracy"] == pytest.approx(np.mean(base_classes == y_test))
  assert report["resmem"]["test_accuracy"] == pytest.approx(np.mean(classes == y_test))
  fitted.save(tmp_path / "resmem")
  loaded = resmem_jax.ResMem.load(tmp_path / "resmem", model, variables)
  np.testing.assert_array_equal(loaded.predict(x_test), classes)
  return loaded


# ------------------------------------------------------------------------------------ NNX


class _NnxNet(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(6, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    embedding = self.dropout(nnx.relu(self.norm(self.hidden(x))))
    return self.out(embedding), embedding


def test_nnx_module_with_rng_streams_and_dropout(data, tmp_path):
  model = _NnxNet(nnx.Rngs(0))
  x_train = data["train"][0]
  model(x_train)  # a training-mode call: batch statistics move away from their initial values
  reference = nnx.clone(model)
  reference.eval()
  train_mode = nnx.clone(model)
  # Dropout at 0.5 changes the embedding in training mode: evaluating in it would show.
  assert not np.allclose(train_mode(x_train)[1], reference(x_train)[1])
  fitted = resmem_jax.fit(model, train=data["train"], **_FIXED)
  assert not model.dropout.deterministic and not model.norm.use_running_average  # mode untouched
  _check_fit(fitted, data, reference, tmp_path, model)
  # Restored in a new session: other RNG streams (they are not what the model computes in
  # inference mode), the same parameters and batch statistics, in training mode: it loads.
  restored = _NnxNet(nnx.Rngs(5))
  nnx.update(restored, *nnx.state(reference, nnx.Param, nnx.BatchStat))
  loaded = resmem_jax.ResMem.load(tmp_path / "resmem", restored)
  np.testing.assert_array_equal(loaded.predict(data["test"][0]), fitted.predict(data["test"][0]))
  model(x_train)  # training mode again: its batch statistics move, so it is another model
  with pytest.raises(ValueError, match="built from another model"):
    resmem_jax.ResMem.load(tmp_path / "resmem", model)


class _NnxTrainArgument(nnx.Module):
  """Dropout switched by a call argument (which overrides ``eval()``), as many NNX models do."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(6, 16, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x, train: bool = True):
    embedding = self.dropout(nnx.relu(self.hidden(x)), deterministic=not train)
    return self.out(embedding), embedding


def test_nnx_module_with_a_train_argument(data, tmp_path):
  model = _NnxTrainArgument(nnx.Rngs(0))
  fitted = resmem_jax.fit(model, train=data["train"], **_FIXED)
  _check_fit(fitted, data, lambda x: model(x, train=False), tmp_path, model)


# ------------------------------------------------------------------------------------ Linen


class _LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x))
    embedding = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
    return nn.Dense(3)(embedding), embedding


def test_linen_module_with_train_argument_and_batch_stats(data, tmp_path):
  model = _LinenNet()
  x_train = data["train"][0]
  variables = model.init(jax.random.key(0), x_train[:2], train=False)
  # One training-mode step so the running statistics are not the initial zeros and ones.
  _, updates = model.apply(variables, x_train, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(1)})
  variables = {**variables, **updates}
  fitted = resmem_jax.fit(model, variables, train=data["train"], **_FIXED)
  direct = lambda x: model.apply(variables, x, train=False)
  _check_fit(fitted, data, direct, tmp_path, model, variables)


# ------------------------------------------------------------------------------------ function


def _apply(variables, x):
  embedding = jnp.tanh(x @ variables["hidden"])
  return embedding @ variables["out"], embedding


def test_plain_function_of_variables_and_inputs(data, tmp_path):
  rng = np.random.default_rng(1)
  variables = {"hidden": rng.normal(size=(6, 8)).astype(np.float32),
               "out": rng.normal(size=(8, 3)).astype(np.float32)}
  fitted = resmem_jax.fit(_apply, variables, train=data["train"], **_FIXED)
  _check_fit(fitted, data, lambda x: _apply(variables, x), tmp_path, _apply, variables)
  other = {**variables, "out": variables["out"] + 1}
  with pytest.raises(ValueError, match="built from another model"):
    resmem_jax.ResMem.load(tmp_path / "resmem", _apply, other)


# ------------------------------------------------------------------------------------ refused

_EXPECTS = (r"^fit expects the model to return \(logits \[batch, classes\], embedding "
            r"\[batch, dim\]\); on a batch of inputs float32\[2, 6\] it returned ")
_W = np.ones((6, 3), np.float32)


class _LinenLogitsOnly(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x)


def _one_line(err) -> str:
  message = str(err.value)
  assert "\n" not in message
  return message


def test_a_model_returning_only_logits_is_refused_in_one_line(data):
  with pytest.raises(ValueError, match=_EXPECTS + r"a single array float32\[2, 3\]$") as err:
    resmem_jax.fit(lambda x: x @ _W, train=data["train"], **_FIXED)
  _one_line(err)
  model = _LinenLogitsOnly()
  variables = model.init(jax.random.key(0), data["train"][0][:1])
  with pytest.raises(ValueError, match=_EXPECTS + r"a single array float32\[2, 3\]$") as err:
    resmem_jax.fit(model, variables, train=data["train"], **_FIXED)
  _one_line(err)


@pytest.mark.parametrize("model,got", [
    # the embedding averaged over the batch: no batch axis
    (lambda x: (x @ _W, x.mean(0)), r"logits float32\[2, 3\] and embedding float32\[6\]"),
    # logits for the first example only: batch sizes differ
    (lambda x: (x[:1] @ _W, x), r"logits float32\[1, 3\] and embedding float32\[2, 6\]"),
    # one class score per example, no classes axis
    (lambda x: ((x @ _W).sum(-1), x), r"logits float32\[2\] and embedding float32\[2, 6\]"),
    (lambda x: (x @ _W, x, x), r"a tuple of 3: \(float32\[2, 3\], float32\[2, 6\], "
                               r"float32\[2, 6\]\)"),
    (lambda x: {"logits": x @ _W, "embedding": x}, r"a dict with keys \['embedding', 'logits'\]"),
])
def test_wrong_shapes_are_refused_in_one_line(data, model, got):
  with pytest.raises(ValueError, match=_EXPECTS + got + "$") as err:
    resmem_jax.fit(model, train=data["train"], **_FIXED)
  _one_line(err)


@pytest.mark.parametrize("typo,meant", [("kgrid", "k_grid"), ("valdation", "validation"),
                                        ("sigma_grd", "sigma_grid")])
def test_mistyped_keywords_get_did_you_mean(data, typo, meant):
  with pytest.raises(ValueError, match=rf"^fit\(\) got an unknown keyword '{typo}' \(did you mean "
                                       rf"'{meant}'\?\); it takes variables, train, validation, "
                                       r"batch_size, progress and the resmem settings backend, "):
    resmem_jax.fit(_apply, {}, train=data["train"], **{typo: (1, 4)})


# ------------------------------------------------------------------------------------ digests


def test_ordinary_variables_digest_as_before():
  tree = {"params": {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                               "bias": jnp.array([0.5, -1.0, 2.0], jnp.bfloat16)}},
          "batch_stats": {"mean": np.ones(3, np.float64), "count": np.int32(7)}}
  # The digest this tree had before PRNG keys were handled: saves and workdirs stay valid.
  assert provenance.variables_digest(tree) == (
      "9989a6a301b2746057783503ccaf18337ba01b9390c8f19b63db57ff7169e257")
  # An NNX module without RNG streams digests as its whole state did (what fit used before).
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  _, variables = api.apply_function(model, None)
  assert provenance.variables_digest(variables) == provenance.variables_digest(nnx.split(model)[1])


def test_prng_keys_are_digested_by_their_data():
  key = jax.random.key(0)
  digest = provenance.variables_digest({"params": np.ones(2, np.float32), "key": key})
  assert digest == provenance.variables_digest({"params": np.ones(2, np.float32), "key": key})
  assert digest != provenance.variables_digest({"params": np.ones(2, np.float32),
                                                "key": jax.random.key(1)})
  # A key and its raw words as uint32 are different content.
  assert digest != provenance.variables_digest({"params": np.ones(2, np.float32),
                                                "key": jax.random.key_data(key)})
  streams = nnx.split(_NnxNet(nnx.Rngs(0)), nnx.RngState, ...)[1]
  assert len(provenance.variables_digest(streams)) == 64
