"""Risk measures, one definition each, used by every experiment (images, language, theory).

All functions take a prediction *vector* per example (probabilities for the base model; the
ResMem vector ``p + r`` otherwise) and integer labels, plus an optional 0/1 ``mask`` that drops
padding. They are pure and jittable, and return means over the unmasked examples.

Log loss of a vector that is not a distribution (ResMem's ``p + r`` can leave the simplex) uses
one rule everywhere, :func:`to_distribution`: clip each entry at ``floor`` and renormalise to sum
to one. For a true distribution whose entries are all >= floor this is the identity.
"""
from __future__ import annotations

import jax.numpy as jnp

LOG_LOSS_FLOOR = 1e-6


def _masked_mean(values, mask):
  values = values.astype(jnp.float32)
  if mask is None:
    # sum / n rather than jnp.mean: XLA's mean multiplies by 1/n, which turns 1617/1617 into
    # 0.99999994 and would hide exact memorization (accuracy exactly 1).
    return jnp.sum(values) / values.size
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def accuracy(pred, labels, mask=None):
  """Fraction of examples whose argmax equals the label (ties go to the lowest index)."""
  return _masked_mean(jnp.argmax(pred, axis=-1) == labels, mask)


def zero_one_error(pred, labels, mask=None):
  """0-1 risk: 1 - accuracy."""
  return 1.0 - accuracy(pred, labels, mask)


def squared_loss(pred, labels, mask=None):
  """Mean over examples of ||pred - onehot(label)||_2^2 (the Brier score for distributions)."""
  onehot = jnp.eye(pred.shape[-1], dtype=jnp.float32)[labels]
  return _masked_mean(jnp.sum((pred.astype(jnp.float32) - onehot) ** 2, axis=-1), mask)


def to_distribution(pred, floor: float = LOG_LOSS_FLOOR):
  """Clip at ``floor`` and renormalise: the documented map from a score vector to probabilities."""
  clipped = jnp.maximum(pred.astype(jnp.float32), floor)
  return clipped / jnp.sum(clipped, axis=-1, keepdims=True)


def log_loss(pred, labels, mask=None, floor: float = LOG_LOSS_FLOOR):
  """Mean negative log probability of the label under ``to_distribution(pred, floor)``."""
  probs = to_distribution(pred, floor)
  picked = jnp.take_along_axis(probs, labels[..., None], axis=-1)[..., 0]
  return _masked_mean(-jnp.log(picked), mask)


def log_loss_from_label_score(label_score, score_sum_clipped, floor: float = LOG_LOSS_FLOOR):
  """Log loss when only the label's score and the clipped row sum are known (large vocabularies).

  Equal to :func:`log_loss` given ``score_sum_clipped = sum(max(pred, floor))``.
  """
  return -(jnp.log(jnp.maximum(label_score, floor)) - jnp.log(score_sum_clipped))


def classification_report(pred, labels, mask=None) -> dict:
  """The metrics reported for a prediction vector, as Python floats."""
  return {
      "accuracy": float(accuracy(pred, labels, mask)),
      "error": float(zero_one_error(pred, labels, mask)),
      "squared_loss": float(squared_loss(pred, labels, mask)),
      "log_loss": float(log_loss(pred, labels, mask)),
  }
