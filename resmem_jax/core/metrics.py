"""Risk measures, one definition each, used by every job (images, tokens, the sweep).

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
