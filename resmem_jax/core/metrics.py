"""Risk measures, one definition each, used by every job (images, tokens, the sweep), and the
paired comparison of two predictors on the same test rows.

Each takes a prediction *vector* per row (probabilities for the base model; ResMem's ``p + r``
otherwise) and integer labels. ``per_row`` gives the per-row values that the jobs sum over
chunks; the ``accuracy`` / ``squared_loss`` / ``log_loss`` means take an optional 0/1 mask.

Log loss of a vector that is not a distribution (ResMem's ``p + r`` can leave the simplex) uses
one rule everywhere, :func:`to_distribution`: clip each entry at ``floor`` and renormalise. For a
distribution whose entries are all >= floor this is the identity.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LOG_LOSS_FLOOR = 1e-6
LOG_LOSS_RULE = (f"-log of the label's entry of to_distribution(pred): clip at {LOG_LOSS_FLOOR:g}, "
                 "renormalise")


def to_distribution(pred, floor: float = LOG_LOSS_FLOOR):
  """Clip at ``floor`` and renormalise: the documented map from a score vector to probabilities."""
  clipped = jnp.maximum(jnp.asarray(pred, jnp.float32), floor)
  return clipped / jnp.sum(clipped, axis=-1, keepdims=True)


def per_row(pred, labels) -> dict:
  """Per-row ``hit`` (argmax == label, ties to the lowest index), ``squared_loss``
  (``||pred - onehot||^2``) and ``log_loss`` (under :func:`to_distribution`), float32 ``[q]``."""
  pred = jnp.asarray(pred, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  onehot = jax.nn.one_hot(labels, pred.shape[-1], dtype=jnp.float32)
  squared = jnp.sum((pred - onehot) ** 2, axis=-1)
  probs = to_distribution(pred)
  log_loss = -jnp.log(jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0])
  hit = (jnp.argmax(pred, axis=-1) == labels).astype(jnp.float32)
  return {"hit": hit, "squared_loss": squared, "log_loss": log_loss}


def _masked_mean(values, mask):
  values = jnp.asarray(values, jnp.float32)
  if mask is None:
    # sum / n rather than jnp.mean: XLA's mean multiplies by 1/n, which turns 1617/1617 into
    # 0.99999994 and would hide exact memorization (accuracy exactly 1).
    return jnp.sum(values) / values.size
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def accuracy(pred, labels, mask=None):
  """Fraction of rows whose argmax equals the label."""
  return _masked_mean(per_row(pred, labels)["hit"], mask)


def squared_loss(pred, labels, mask=None):
  """Mean of ``||pred - onehot(label)||^2`` (the Brier score for distributions)."""
  return _masked_mean(per_row(pred, labels)["squared_loss"], mask)


def log_loss(pred, labels, mask=None):
  """Mean negative log probability of the label under ``to_distribution(pred)``."""
  return _masked_mean(per_row(pred, labels)["log_loss"], mask)


BOOTSTRAP_RESAMPLES = 10_000
SIGNIFICANCE = 0.05


# Below this a printed p-value says only ``< 1e-300``: an exact test's p-value underflows to 0.0
# (the smallest positive double is about 5e-324), and a printed 0 would claim certainty.
P_VALUE_FLOOR = 1e-300


def format_p_value(p: float) -> str:
  """A p-value for print: two significant digits, or ``< 1e-300`` where it underflowed to 0."""
  return f"< {P_VALUE_FLOOR:g}" if p < P_VALUE_FLOOR else f"{p:.2g}"


def format_p(p: float) -> str:
  """``p = 0.031``, or ``p < 1e-300`` where the p-value underflowed: what every printed line says
  (never ``p = 0``, nor ``p = < 1e-300``)."""
  text = format_p_value(p)
  return f"p {text}" if text.startswith("<") else f"p = {text}"


def rows_for_significance(gained: int, lost: int, rows: int, level: float = SIGNIFICANCE):
  """About how many rows, gained and lost at the observed rates, would make the two-sided McNemar
  test significant at ``level``; None when nothing was gained on balance."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if gained <= lost or rows <= 0:
    return None
  p = lambda m: stats.binomtest(round(gained * m / rows), max(1, round((gained + lost) * m / rows)),
                                0.5).pvalue
  if p(rows) < level:
    return rows
  low, high = rows, 2 * rows
  while p(high) >= level:
    low, high = high, 2 * high
  while high - low > max(1, low // 100):  # to 1%
    middle = (low + high) // 2
    low, high = (low, middle) if p(middle) < level else (middle, high)
  return int(high)


def paired_comparison(hits, base_hits, *, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> dict:
  """The accuracy gain of one predictor over another on the same rows, with its uncertainty.

  ``hits`` / ``base_hits`` are per-row 0/1 correctness. The gain is the difference of the two
  accuracies; ``ci95`` is a paired percentile bootstrap over rows (rows resampled with
  replacement, both predictors kept together); ``p_value`` is the exact two-sided McNemar test:
  under "no difference" the rows where exactly one predictor is right fall either way with
  probability 1/2 (a binomial test on those discordant rows).
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  hits = np.asarray(hits, bool)
  base_hits = np.asarray(base_hits, bool)
  if hits.shape != base_hits.shape or hits.ndim != 1 or hits.size == 0:
    raise ValueError(f"need two equal non-empty 1-D hit arrays, got {hits.shape} and "
                     f"{base_hits.shape}")
  n = hits.size
  gained = int(np.sum(hits & ~base_hits))
  lost = int(np.sum(~hits & base_hits))
  # A row's paired difference is +1, -1 or 0, so a resample is a draw of those three counts.
  counts = np.random.default_rng(seed).multinomial(
      n, [gained / n, lost / n, (n - gained - lost) / n], size=resamples)
  gains = (counts[:, 0] - counts[:, 1]) / n
  low, high = np.percentile(gains, [2.5, 97.5])
  discordant = gained + lost
  p_value = float(stats.binomtest(gained, discordant, 0.5).pvalue) if discordant else 1.0
  return {"test_accuracy_gain": (gained - lost) / n, "ci95": [float(low), float(high)],
          "p_value": p_value, "rows": n, "gained": gained, "lost": lost,
          "rows_for_significance": rows_for_significance(gained, lost, n),
          "method": (f"paired bootstrap over test rows ({resamples} resamples, percentile CI); "
                     "exact two-sided McNemar test on the rows where exactly one is right")}
