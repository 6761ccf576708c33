"""resmem_jax.fit around a user's own Flax model: the paper's rule by default, predict_proba that
agrees with predict, the opt-in gate beside ResMem."""
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import resmem_jax


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    embedding = nn.relu(nn.Dense(16)(x))
    return nn.Dense(10)(embedding), embedding


@pytest.fixture(scope="module")
def digits_model():
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  order = np.random.default_rng(0).permutation(len(y))
  x, y = x[order], y[order].astype(np.int32)
  splits = {"train": (x[:1200], y[:1200]), "validation": (x[1200:1440], y[1200:1440]),
            "test": (x[1440:], y[1440:])}
  model = _Net()
  variables = model.init(jax.random.key(0), x[:1])
  optimizer = optax.adam(1e-2)
  state = optimizer.init(variables)

  @jax.jit
  def step(variables, state, xb, yb):
    loss = lambda v: optax.softmax_cross_entropy_with_integer_labels(model.apply(v, xb)[0],
                                                                     yb).mean()
    updates, state = optimizer.update(jax.grad(loss)(variables), state)
    return optax.apply_updates(variables, updates), state

  rng = np.random.default_rng(1)
  for _ in range(150):
    batch = rng.integers(0, 1200, 64)
    variables, state = step(variables, state, x[batch], y[batch])
  return model, variables, splits


_GRID = dict(k_grid=(1, 4, 16), sigma_grid=(0.1, 1.0, 10.0), temperature_grid=(1.0, 2.0))


def test_fit_memorizes_and_predict_proba_agrees_with_predict(digits_model):
  model, variables, splits = digits_model
  resmem = resmem_jax.fit(model, variables, train=splits["train"],
                          validation=splits["validation"], progress=False, **_GRID)
  assert resmem.gate is None and resmem.hparams["k"] in (1, 4, 16)
  x_test, y_test = splits["test"]
  classes = resmem.predict(x_test)
  probabilities = resmem.predict_proba(x_test)
  np.testing.assert_array_equal(np.argmax(probabilities, -1), classes)  # every row
  np.testing.assert_array_equal(classes, np.argmax(resmem.predict_scores(x_test), -1))
  assert np.allclose(probabilities.sum(-1), 1.0, atol=1e-5) and np.all(probabilities >= 0)
  report = resmem.evaluate(x_test, y_test)
  # The reported ResMem is the memorizing predictor: its accuracy is that of predict().
  assert report["resmem"]["test_accuracy"] == pytest.approx(np.mean(classes == y_test))
  assert report["comparison"]["rows"] == len(y_test)


def test_the_gate_is_opt_in_and_reported_beside_resmem(digits_model):
  model, variables, splits = digits_model
  plain = resmem_jax.fit(model, variables, train=splits["train"],
                         validation=splits["validation"], progress=False, **_GRID)
  gated = resmem_jax.fit(model, variables, train=splits["train"],
                         validation=splits["validation"], progress=False, gate_alpha=0.05, **_GRID)
  assert gated.hparams == plain.hparams  # the gate changes no choice and no prediction
  np.testing.assert_array_equal(gated.predict(splits["test"][0]), plain.predict(splits["test"][0]))
  g = gated.gate
  assert g["enabled"] and g["memorize"] == (g["p_value"] <= 0.05)
  assert g["held_out"]["rows"] == 120  # the test half of 240 validation rows
  with pytest.raises(ValueError, match="ResMem now always memorizes.*gate_alpha"):
    resmem_jax.fit(model, variables, train=splits["train"], validation=splits["validation"],
                   memorize_if_p_below=1.0)


# ----------------------------------------------------------------------------- inputs checked


@pytest.fixture(scope="module")
def linear():
  """A fixed linear model (5 classes, its inputs as the embedding), its data and a fit."""
  rng = np.random.default_rng(3)
  weights = rng.normal(size=(8, 5)).astype(np.float32)
  model = lambda x: (x @ weights, x)
  x = rng.normal(size=(160, 8)).astype(np.float32)
  y = rng.integers(0, 5, 160)
  data = {"train": (x[:80], y[:80]), "validation": (x[80:120], y[80:120]),
          "test": (x[120:], y[120:])}
  grid = dict(k_grid=(1, 4), sigma_grid=(1.0,), temperature_grid=(1.0,), progress=False)
  fitted = resmem_jax.fit(model, train=data["train"], validation=data["validation"], **grid)
  return model, data, grid, fitted


_RANGE = r"labels must be class ids in \[0, 5\) \(the model returns 5 logits\), got range "


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("change,shown", [
    (lambda y: y + 10, r"\[1[0-4], 14\]"),
    (lambda y: y * 0 - 1, r"\[-1, -1\]"),
    # int64 ids past int32 would wrap to valid-looking ids in the int32 cast: checked before it.
    (lambda y: y.astype(np.int64) + 2**32, r"\[429496729[6-9], 4294967300\]"),
])
def test_fit_refuses_labels_out_of_range_in_every_split(linear, split, change, shown):
  model, data, grid, _ = linear
  splits = dict(data)
  del splits["test"]
  splits[split] = (data[split][0], change(data[split][1]))
  with pytest.raises(ValueError, match=f"^{split}: {_RANGE}{shown}; fix the labels"):
    resmem_jax.fit(model, **splits, **grid)
  # The same labels in an iterable of batches are refused as the batch is read.
  splits[split] = [splits[split]]
  with pytest.raises(ValueError, match=f"^{split} batch 0: {_RANGE}{shown}"):
    resmem_jax.fit(model, **splits, **grid)


@pytest.mark.parametrize("change,shown", [
    (lambda y: y + 10, r"\[1[0-4], 14\]"),
    (lambda y: y * 0 - 1, r"\[-1, -1\]"),
    (lambda y: y.astype(np.int64) + 2**32, r"\[429496729[6-9], 4294967300\]"),
])
def test_evaluate_refuses_labels_out_of_range(linear, change, shown):
  _, data, _, fitted = linear
  x, y = data["test"]
  with pytest.raises(ValueError, match=f"^test: {_RANGE}{shown}"):
    fitted.evaluate(x, change(y))
  with pytest.raises(ValueError, match=f"^test batch 0: {_RANGE}{shown}"):
    fitted.evaluate([(x, change(y))])
  assert fitted.evaluate(x, y.astype(np.int64))["rows"] == len(y)  # int64 in range is fine


def test_labels_must_be_integers_even_when_whole_numbers(linear):
  model, data, grid, fitted = linear
  x, y = data["test"]
  with pytest.raises(ValueError, match=r"test: labels must be integer class ids, got dtype "
                                       r"float64 .*labels.astype\(np.int32\)"):
    fitted.evaluate(x, y * 1.0)
  with pytest.raises(ValueError, match="validation: labels must be integer class ids"):
    resmem_jax.fit(model, train=data["train"], validation=(data["validation"][0],
                                                           data["validation"][1] * 1.0), **grid)


def test_masked_out_label_positions_may_hold_any_id(linear):
  _, data, _, fitted = linear
  x, y = data["test"]
  padded = np.where(np.arange(len(y)) % 2 == 0, y, -100)  # e.g. an ignore index
  mask = padded >= 0
  result = fitted.evaluate([{"inputs": x, "labels": padded, "mask": mask}])
  assert result["rows"] == mask.sum()


@pytest.mark.parametrize("which", ["train", "validation"])
def test_empty_splits_are_refused_in_one_line(linear, which):
  model, data, grid, fitted = linear
  x, y = data[which]
  splits = {"train": data["train"], "validation": data["validation"], which: (x[:0], y[:0])}
  with pytest.raises(ValueError, match=f"^{which}: the data has 0 examples"):
    resmem_jax.fit(model, **splits, **grid)
  splits[which] = [(x[:0], y[:0])]
  with pytest.raises(ValueError, match=f"the {which} data has 0 examples"):
    resmem_jax.fit(model, **splits, **grid)
  with pytest.raises(ValueError, match="^test: the data has 0 examples"):
    fitted.evaluate(x[:0], y[:0])


def test_k_and_batch_size_are_checked_before_the_first_pass(linear):
  model, data, grid, _ = linear
  with pytest.raises(ValueError, match=r"k=5000 is larger than the memory: the training split "
                                       r"gives 80 rows; set k <= 80"):
    resmem_jax.fit(model, train=data["train"], validation=data["validation"],
                   **dict(grid, k=5000))
  with pytest.raises(ValueError, match=r"k_grid=\(5000,\) has no k <= the 80 rows"):
    resmem_jax.fit(model, train=data["train"], validation=data["validation"],
                   **dict(grid, k_grid=(5000,)))
  with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
    resmem_jax.fit(model, train=data["train"], validation=data["validation"], batch_size=0, **grid)
  with pytest.raises(ValueError, match=r"batch_size=1,000,000,000,000 cannot fit: .* x \(8,\) x "
                                       r"4 bytes = 3.2e\+04 GB of inputs per batch"):
    resmem_jax.fit(model, train=data["train"], validation=data["validation"],
                   batch_size=10**12, **grid)


def test_predict_refuses_complex_inputs_and_answers_zero_rows(linear):
  _, data, _, fitted = linear
  x = data["test"][0]
  with pytest.raises(ValueError, match="inputs must be real numbers .*got dtype complex64"):
    fitted.predict(x + 1j)
  assert fitted.predict(x[:0]).shape == (0,)
  assert fitted.predict_proba(x[:0]).shape == (0, 5)
