"""resmem_jax.core, the pure math, against a few lines of NumPy each."""
import numpy as np
import pytest

import resmem_jax
from resmem_jax.core import metrics, predictor, residuals, selection


def _softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _floor_log_loss(pred, labels):
  probs = np.maximum(pred, metrics.LOG_LOSS_FLOOR)
  probs = probs / probs.sum(-1, keepdims=True)
  return -np.log(probs[np.arange(len(labels)), labels])


# ----------------------------------------------------------------------------- residuals


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_classification_residuals_match_numpy(temperature):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=64)
  got = resmem_jax.residuals(labels, logits, temperature)
  want = np.eye(7)[labels] - _softmax(logits / temperature)
  assert got.dtype == np.float32 and got.shape == (64, 7)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got.sum(axis=1), 0.0, atol=1e-5)  # onehot and p both sum to one


def test_residuals_finite_for_any_positive_temperature():
  logits = np.array([[80.0, -80.0, 3.0], [1.0, 1.0, 1.0]], np.float32)
  for temperature in (1e-30, 1e-6, 1e6):
    got = resmem_jax.residuals(np.array([0, 2]), logits, temperature)
    assert np.all(np.isfinite(got))
  cold = resmem_jax.residuals(np.array([1, 2]), logits, 1e-30)
  np.testing.assert_allclose(cold[0], [-1.0, 1.0, 0.0])  # T -> 0: p is one-hot on the argmax


def test_regression_residuals():
  got = resmem_jax.regression_residuals(np.array([1.0, 2.0, -3.0]), np.array([0.5, 2.5, -1.0]))
  np.testing.assert_allclose(got, [[0.5], [-0.5], [-2.0]])
  assert got.dtype == np.float32


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), "hot"])
def test_bad_temperature(temperature):
  with pytest.raises(ValueError, match="temperature"):
    resmem_jax.residuals(np.zeros(2, int), np.zeros((2, 3), np.float32), temperature)


def test_bad_residual_inputs():
  logits = np.zeros((3, 4), np.float32)
  for labels in (np.zeros(2, int), np.array([0, 1, 4]), np.array([0.0, 1.0, 2.0])):
    with pytest.raises(ValueError, match="labels"):
      resmem_jax.residuals(labels, logits, 1.0)
  with pytest.raises(ValueError, match="logits contains NaN"):
    resmem_jax.residuals(np.zeros(3, int), np.full((3, 4), np.nan, np.float32), 1.0)
  with pytest.raises(ValueError, match="logits must have 2"):
    resmem_jax.residuals(np.zeros(3, int), np.zeros(3, np.float32), 1.0)
  with pytest.raises(ValueError, match="shape"):
    resmem_jax.regression_residuals(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match="targets contains NaN"):
    resmem_jax.regression_residuals(np.array([np.inf]), np.zeros(1))


@pytest.mark.parametrize("with_labels", [True, False])
def test_sparse_top_m_keeps_label_and_most_negative(with_labels):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 9)).astype(np.float32) * 3
  labels = rng.integers(0, 9, size=50).astype(np.int32)
  dense = resmem_jax.residuals(labels, logits, 2.0)
  columns, values = map(np.asarray, residuals.sparse_top_m(dense, 3, labels if with_labels else None))
  assert columns.shape == values.shape == (50, 4)
  for i in range(50):
    assert columns[i, 0] == labels[i]
    others = [j for j in np.argsort(dense[i]) if j != labels[i]][:3]  # most negative
    assert set(columns[i, 1:]) == set(others)
    np.testing.assert_allclose(values[i], dense[i, columns[i]], atol=1e-6)
  # m >= C - 1 keeps every entry: the sparse form is exact.
  columns, values = residuals.sparse_top_m(dense, 20, labels)
  np.testing.assert_allclose(np.asarray(predictor.scatter_rows(columns, values, 9)), dense, atol=1e-6)


# ----------------------------------------------------------------------------- predictor


def _np_weights(d, sigma):
  return _softmax(-np.asarray(d, np.float64) / sigma)


def test_weights_estimate_prediction_match_numpy():
  rng = np.random.default_rng(1)
  d = rng.uniform(0, 3, size=(10, 5)).astype(np.float32)
  r = rng.normal(size=(10, 5, 4)).astype(np.float32)
  base = rng.uniform(size=(10, 4)).astype(np.float32)
  w = predictor.neighbour_weights(d, 0.7)
  np.testing.assert_allclose(w, _np_weights(d, 0.7), atol=1e-6)
  want = np.einsum("qk,qkc->qc", _np_weights(d, 0.7), r)
  np.testing.assert_allclose(predictor.residual_estimate(w, r), want, atol=1e-5)
  np.testing.assert_allclose(predictor.resmem_prediction(base, w, r), base + want, atol=1e-5)


def test_sparse_rows_give_the_dense_estimate():
  rng = np.random.default_rng(2)
  q, k, c, m = 6, 4, 11, 3
  columns = np.stack([rng.permutation(c)[:m] for _ in range(q * k)]).reshape(q, k, m)
  values = rng.normal(size=(q, k, m)).astype(np.float32)
  dense = np.zeros((q, k, c), np.float32)
  np.put_along_axis(dense, columns, values, axis=-1)
  w = predictor.neighbour_weights(rng.uniform(size=(q, k)), 0.5)
  np.testing.assert_allclose(predictor.residual_estimate(w, values, columns, c),
                             predictor.residual_estimate(w, dense), atol=1e-6)


def test_tiny_sigma_is_nearest_neighbour_and_finite():
  d = np.array([[0.3, 0.1, 0.2], [5.0, 5.0 + 1e-3, 7.0]], np.float32)
  for sigma in (1e-6, 1e-30):
    w = np.asarray(predictor.neighbour_weights(d, sigma))
    assert np.all(np.isfinite(w))
    np.testing.assert_array_equal(w, [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("inf"), float("nan"), "wide", np.ones(3)])
def test_bad_sigma(sigma):
  with pytest.raises(ValueError, match="sigma"):
    predictor.check_sigma(sigma)


def test_knn_distribution_and_mixture_match_numpy():
  weights = np.array([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]], np.float32)
  labels = np.array([[2, 0, 2], [1, 1, 3]], np.int32)
  p_knn = np.asarray(predictor.knn_distribution(weights, labels, 4))
  np.testing.assert_allclose(p_knn, [[0.3, 0, 0.7, 0], [0, 1, 0, 0]], atol=1e-7)
  p = np.full((2, 4), 0.25, np.float32)
  np.testing.assert_allclose(np.asarray(predictor.knnlm_mixture(p_knn, p, 0.2)),
                             0.2 * p_knn + 0.8 * p, atol=1e-7)


def test_base_prediction_is_tempered_softmax():
  z = np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32) * 4
  for t in (0.5, 1.0, 4.0):
    np.testing.assert_allclose(predictor.base_prediction(z, t), _softmax(z / t), atol=1e-6)


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_numpy():
  rng = np.random.default_rng(1)
  pred = rng.normal(size=(50, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 50)
  mask = rng.random(50) < 0.7
  acc = np.mean((pred.argmax(-1) == labels)[mask])
  assert float(metrics.accuracy(pred, labels, mask)) == pytest.approx(acc, abs=1e-6)
  sq = np.sum((pred - np.eye(7)[labels]) ** 2, -1)[mask].mean()
  assert float(metrics.squared_loss(pred, labels, mask)) == pytest.approx(sq, rel=1e-5)
  ll = _floor_log_loss(pred, labels)[mask].mean()
  assert float(metrics.log_loss(pred, labels, mask)) == pytest.approx(ll, rel=1e-5)
  rows = metrics.per_row(pred, labels)
  np.testing.assert_array_equal(np.asarray(rows["hit"]), pred.argmax(-1) == labels)


def test_log_loss_rule_is_identity_on_distributions():
  p = np.array([[0.2, 0.5, 0.3]], np.float32)
  np.testing.assert_allclose(np.asarray(metrics.to_distribution(p)), p, rtol=1e-6)
  assert float(metrics.log_loss(p, np.array([1]))) == pytest.approx(-np.log(0.5), rel=1e-6)


def test_exact_memorization_reads_exactly_one():
  labels = np.arange(1617) % 3
  assert float(metrics.accuracy(np.eye(3, dtype=np.float32)[labels], labels)) == 1.0


# ----------------------------------------------------------------------------- selection


def _sweep_problem(rng, n=60, q=13, c=6, kmax=5, temps=(0.5, 2.0)):
  train_logits = rng.normal(size=(n, c)).astype(np.float32)
  train_labels = rng.integers(0, c, n)
  val_logits = rng.normal(size=(q, c)).astype(np.float32)
  val_labels = rng.integers(0, c, q)
  d = np.sort(rng.uniform(0.1, 2.0, size=(q, kmax)), axis=1).astype(np.float32)
  ids = np.stack([rng.permutation(n)[:kmax] for _ in range(q)])
  stores = {t: resmem_jax.residuals(train_labels, train_logits, t) for t in temps}
  return train_labels, val_logits, val_labels, d, ids, stores


@pytest.mark.parametrize("sparse", [False, True])
def test_sweep_matches_numpy_reference(sparse):
  rng = np.random.default_rng(0)
  train_labels, val_logits, val_labels, d, ids, stores = _sweep_problem(rng)
  c = val_logits.shape[1]
  if sparse:  # top_m = C - 1: the sparse form is exact, so the same reference applies
    sparse_stores = {t: tuple(map(np.asarray, residuals.sparse_top_m(r, c - 1))) for t, r in stores.items()}
    rows = lambda t, nb: (sparse_stores[t][1][nb], sparse_stores[t][0][nb])
  else:
    rows = lambda t, nb: (stores[t][nb], None)
  sweep = selection.SelectionSweep(k_grid=(1, 3, 5), sigma_grid=(0.05, 0.5, 5.0),
                                   temperature_grid=tuple(stores), num_classes=c,
                                   mix_grid=(0.0, 0.3, 1.0), lambda_grid=(0.25, 1.0),
                                   max_elements=64)  # several chunks
  sweep.add(d[:7], ids[:7], val_logits[:7], val_labels[:7], rows, train_labels[ids[:7]])
  sweep.add(d[7:], ids[7:], val_logits[7:], val_labels[7:], rows, train_labels[ids[7:]])
  resmem_points, knn_points = sweep.points()
  assert len(resmem_points) == 3 * 3 * 2 and len(knn_points) == 3 * 3 * 2 * 2
  onehot = np.eye(c)
  for point in resmem_points + knn_points:
    w = _np_weights(d[:, :point.k], point.sigma)
    p = _softmax(val_logits / point.temperature)
    if point.knn_lambda is None:
      pred = p + np.einsum("qk,qkc->qc", w, stores[point.temperature][ids[:, :point.k]])
    else:
      p_knn = np.einsum("qk,qkc->qc", w, onehot[train_labels[ids[:, :point.k]]])
      pred = point.knn_lambda * p_knn + (1 - point.knn_lambda) * p
    assert point.accuracy == pytest.approx(np.mean(pred.argmax(-1) == val_labels), abs=1e-6)
    assert point.squared_loss == pytest.approx(
        np.mean(np.sum((pred - onehot[val_labels]) ** 2, -1)), rel=1e-4)
    if point.knn_lambda is None:  # the probability output, at its best mix with the base
      losses = {mix: np.mean(_floor_log_loss(_np_probabilities(pred, _softmax(val_logits), mix),
                                             val_labels)) for mix in (0.0, 0.3, 1.0)}
      assert point.base_mix == min(losses, key=losses.get)
      assert point.log_loss == pytest.approx(min(losses.values()), rel=1e-4)
    else:
      assert point.log_loss == pytest.approx(np.mean(_floor_log_loss(pred, val_labels)), rel=1e-4)
  base = sweep.base_scores()
  assert base["accuracy"] == pytest.approx(np.mean(val_logits.argmax(-1) == val_labels))
  assert base["log_loss"] == pytest.approx(np.mean(_floor_log_loss(_softmax(val_logits), val_labels)),
                                           rel=1e-4)
  for t in stores:  # the base model scored at every temperature of the grid
    p = _softmax(val_logits / t)
    assert sweep.base_scores(temperature=t)["squared_loss"] == pytest.approx(
        np.mean(np.sum((p - onehot[val_labels]) ** 2, -1)), rel=1e-4)
  assert sweep.count == 13


def test_best_follows_each_criterion_and_breaks_ties_by_k():
  points = [selection.GridPoint(4, 1.0, 1.0, accuracy=0.9, squared_loss=0.20, log_loss=0.5),
            selection.GridPoint(2, 1.0, 1.0, accuracy=0.8, squared_loss=0.10, log_loss=0.6),
            selection.GridPoint(1, 1.0, 1.0, accuracy=0.9, squared_loss=0.30, log_loss=0.4),
            selection.GridPoint(8, 1.0, 1.0, accuracy=0.9, squared_loss=0.30, log_loss=0.4)]
  assert selection.best(points, "squared_loss").k == 2
  assert selection.best(points, "accuracy").k == 1  # 0.9 three times; lowest log loss; smaller k
  assert selection.best(points, "log_loss").k == 1
  with pytest.raises(ValueError, match="criterion"):
    selection.best(points, "perplexity")


def test_sweep_rejects_bad_input():
  with pytest.raises(ValueError, match="k_grid"):
    selection.SelectionSweep(k_grid=(), sigma_grid=(1.0,), temperature_grid=(1.0,), num_classes=3)
  with pytest.raises(ValueError, match="knn_lambda_grid"):
    selection.SelectionSweep(k_grid=(1,), sigma_grid=(1.0,), temperature_grid=(1.0,),
                             num_classes=3, lambda_grid=(1.5,))
  sweep = selection.SelectionSweep(k_grid=(4,), sigma_grid=(1.0,), temperature_grid=(1.0,),
                                   num_classes=3)
  rows = lambda t, nb: (np.zeros(nb.shape + (3,), np.float32), None)
  with pytest.raises(ValueError, match="only 2 neighbours"):
    sweep.add(np.ones((4, 2)), np.zeros((4, 2), int), np.zeros((4, 3)), np.zeros(4, int), rows)
  with pytest.raises(ValueError, match="no rows"):
    sweep.points()


def _np_probabilities(pred, base, mix):
  """The probability output's rule in NumPy (core/predictor.py: resmem_probabilities)."""
  out = np.zeros_like(np.asarray(pred, np.float64))
  for i, (s, p) in enumerate(zip(np.asarray(pred, np.float64), np.asarray(base, np.float64))):
    a = int(np.argmax(s))
    positive = np.maximum(s, 0)
    n = positive / positive.sum() if positive.sum() > 0 else np.eye(len(s))[a]
    m = mix
    for j in range(len(s)):
      dn, dp = n[a] - n[j], p[a] - p[j]
      if dp <= 0 and dn > dp:  # the base would tie j with a at mix dn / (dn - dp)
        m = min(m, 0.5 * dn / (dn - dp))
    out[i] = (1 - m) * n + m * p
  return out


def test_probability_output_keeps_resmem_class_and_matches_numpy():
  rng = np.random.default_rng(4)
  q, c = 500, 6
  base = _softmax(3 * rng.normal(size=(q, c)))
  residual = 0.4 * rng.normal(size=(q, c))
  pred = (base + residual - residual.mean(-1, keepdims=True)).astype(np.float32)
  pred[0] = [0.5, 0.5, 0, 0, 0, 0]          # a tie: argmax takes the lower index
  base[0] = [0.1, 0.8, 0.1, 0, 0, 0]        # whose base prefers the other
  pred[1] = -0.1                            # no positive entry: one-hot on argmax
  for mix in (0.0, 0.3, 1.0):
    probs = np.asarray(predictor.resmem_probabilities(pred, base, mix))
    assert np.all(probs >= 0) and np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(-1), pred.argmax(-1))
    np.testing.assert_allclose(probs, _np_probabilities(pred, base, mix), atol=2e-6)
  # Where the base agrees with ResMem's class, mix = 1 is the base model itself; mix = 0 is n.
  agree = base.argmax(-1) == pred.argmax(-1)
  assert 0.2 < agree.mean() < 0.98
  probs = np.asarray(predictor.resmem_probabilities(pred, base, 1.0))
  np.testing.assert_allclose(probs[agree], base[agree], atol=1e-6)
  positive = np.maximum(pred[2:], 0)
  np.testing.assert_allclose(predictor.resmem_probabilities(pred, base, 0.0)[2:],
                             positive / positive.sum(-1, keepdims=True), atol=1e-6)


def test_paired_comparison_matches_its_definition():
  rng = np.random.default_rng(5)
  base = rng.random(2000) < 0.8
  new = base.copy()
  flip = rng.choice(2000, 120, replace=False)
  new[flip[:90]] = True
  new[flip[90:]] = False
  out = metrics.paired_comparison(new, base, resamples=4000)
  gained, lost = int(np.sum(new & ~base)), int(np.sum(~new & base))
  assert (out["gained"], out["lost"]) == (gained, lost)
  assert out["test_accuracy_gain"] == pytest.approx(new.mean() - base.mean())
  low, high = out["ci95"]
  assert low < out["test_accuracy_gain"] < high and high - low < 0.03
  from scipy import stats
  assert out["p_value"] == pytest.approx(stats.binomtest(gained, gained + lost).pvalue)
  same = metrics.paired_comparison(base, base)
  assert same["test_accuracy_gain"] == 0 and same["p_value"] == 1.0 and same["ci95"] == [0, 0]
  with pytest.raises(ValueError, match="1-D"):
    metrics.paired_comparison(base, base[:10])


def test_rows_for_significance_and_p_value_format():
  from scipy import stats
  assert metrics.rows_for_significance(2, 0, 360) > 360  # 2 of 2 discordant: p = 0.5
  needed = metrics.rows_for_significance(3, 1, 360)
  scaled = lambda m: stats.binomtest(round(3 * m / 360), round(4 * m / 360)).pvalue
  assert scaled(needed) < 0.05 <= scaled(0.8 * needed)  # about the smallest such count
  assert metrics.rows_for_significance(90, 30, 2000) == 2000  # already significant
  assert metrics.rows_for_significance(1, 1, 100) is None  # no gain to detect
  assert metrics.format_p_value(0.0) == "< 1e-300" and metrics.format_p_value(0.0312) == "0.031"


# ----------------------------------------------------------------------------- folds


def test_folds_are_blocks_of_rows_and_held_out_scores_cross_fit():
  """Rows go to folds in blocks (a sequence's tokens together), whatever the chunking; a rule's
  held-out score is the point chosen on one fold scored on the other, both ways."""
  np.testing.assert_array_equal(selection.fold_of(np.arange(10), 3), [0, 0, 0, 1, 1, 1, 0, 0, 0, 1])
  rng = np.random.default_rng(0)
  train_labels, val_logits, val_labels, d, ids, stores = _sweep_problem(rng, q=40)
  c = val_logits.shape[1]
  rows = lambda t, nb: (stores[t][nb], None)
  grids = dict(k_grid=(1, 3, 5), sigma_grid=(0.05, 0.5, 5.0), temperature_grid=tuple(stores),
               num_classes=c, mix_grid=(0.0, 0.3, 1.0), fold_block=4)
  sweep = selection.SelectionSweep(**grids, max_elements=64)
  sweep.add(d[:7], ids[:7], val_logits[:7], val_labels[:7], rows)  # blocks continue over chunks
  sweep.add(d[7:], ids[7:], val_logits[7:], val_labels[7:], rows)
  folds = selection.fold_of(np.arange(40), 4)
  assert sweep.fold_counts.tolist() == [20, 20]
  alone = {}
  for fold in (0, 1):
    alone[fold] = selection.SelectionSweep(**grids)
    where = folds == fold
    alone[fold].add(d[where], ids[where], val_logits[where], val_labels[where], rows)
    for a, b in zip(sweep.points(fold)[0], alone[fold].points()[0]):
      assert (a.k, a.sigma, a.temperature, a.base_mix) == (b.k, b.sigma, b.temperature, b.base_mix)
      assert a.squared_loss == pytest.approx(b.squared_loss, rel=1e-5)
    for t in (1.0, *stores):
      assert sweep.base_scores(fold, t) == pytest.approx(alone[fold].base_scores(temperature=t))
  held = sweep.held_out_scores("squared_loss")
  want = {"accuracy": 0.0, "base_accuracy": 0.0}
  for chosen_on, tested_on in ((0, 1), (1, 0)):
    chosen = selection.best(sweep.points(chosen_on)[0], "squared_loss")
    scored = [p for p in alone[tested_on].points()[0]
              if (p.k, p.sigma, p.temperature) == (chosen.k, chosen.sigma, chosen.temperature)]
    # the held-out log loss keeps the chosen mix; accuracy does not depend on it
    want["accuracy"] += 0.5 * scored[0].accuracy
    want["base_accuracy"] += 0.5 * alone[tested_on].base_scores()["accuracy"]
  assert held["accuracy"] == pytest.approx(want["accuracy"])
  assert held["base_accuracy"] == pytest.approx(want["base_accuracy"])
  only_half = sweep.held_out_scores("accuracy", temperatures=(0.5,))
  assert all(p["temperature"] == 0.5 for p in only_half["chosen"])
  with pytest.raises(ValueError, match="not all in the sweep's grid"):
    sweep.held_out_scores("accuracy", temperatures=(8.0,))
  with pytest.raises(ValueError, match="fold_block"):
    selection.SelectionSweep(**{**grids, "fold_block": 0})
