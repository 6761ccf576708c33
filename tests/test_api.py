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
