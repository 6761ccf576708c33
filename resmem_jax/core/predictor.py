"""ResMem's prediction from a query's neighbours: the one place the rule is written.

For a query with base logits ``z`` and its k nearest memory keys at Euclidean distances ``d_i``
holding residuals ``r_i``:

  base prediction   p = softmax(z / T)
  weights           w_i = softmax_i(-(d_i - d_min) / sigma)     (d_min: the row's nearest)
  estimate          r(x) = sum_i w_i r_i
  ResMem            p + r(x)
  kNN-LM            lam * p_knn + (1 - lam) * p,  p_knn(v) = sum_i w_i [label_i == v]

ResMem's class is argmax(p + r(x)), as in the paper. The vector p + r(x) can leave the simplex, so
its probability output mixes n = normalize(max(p + r(x), 0)) with p_1, the base model's own
prediction (T = 1): (1 - m) * n + m * p_1, ``mix`` chosen on validation log loss. A row whose base
model ranks another class above ResMem's takes a smaller m, so that ResMem's class stays the
probability output's argmax on every row (:func:`resmem_probabilities`).

Subtracting each row's smallest distance leaves the softmax unchanged but keeps it finite for any
positive finite sigma (the nearest neighbour always gets exp(0)). Residual rows come dense
(``values [..., k, C]``) or sparse (``values``/``columns [..., k, m]``: the other entries are 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


PROBABILITY_RULE = ("(1 - m) * normalize(max(p + r, 0)) + m * p_base, m = base_mix, lowered per row "
                    "to half the mix at which p_base would overturn ResMem's class")


def base_prediction(logits, temperature=1.0):
  """``softmax(logits / T)`` over the last axis, float32, finite for any positive finite T.

  The row maximum is subtracted before dividing by T, so a tiny T cannot overflow.
  """
  logits = jnp.asarray(logits, jnp.float32)
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  return jax.nn.softmax(shifted / jnp.asarray(temperature, jnp.float32), axis=-1)


def check_positive(value, name: str) -> float:
  """``value`` as a float, or ValueError unless it is one positive finite number."""
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a single number, got an array of shape {np.shape(value)}")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a positive number, got {value!r}") from None
  if not np.isfinite(number) or number <= 0:
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")
  return number


def check_sigma(sigma) -> float | jax.core.Tracer:
  """``sigma`` as a float (traced values pass through), or ValueError."""
  if isinstance(sigma, jax.core.Tracer):
    return sigma
  return check_positive(sigma, "sigma")


def neighbour_weights(distances, sigma):
  """``softmax_i(-(d_i - d_min) / sigma)`` over the last (neighbour) axis, float32."""
  distances = jnp.asarray(distances, jnp.float32)
  nearest = jnp.min(distances, axis=-1, keepdims=True)
  return jax.nn.softmax(-(distances - nearest) / jnp.asarray(sigma, jnp.float32), axis=-1)


def scatter_rows(columns, values, num_outputs: int):
  """Dense ``[q, C]`` rows from per-row (column, value) pairs ``[q, n]``; repeats add up."""
  columns = jnp.asarray(columns, jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(columns.shape[0])[:, None], columns.shape)
  out = jnp.zeros((columns.shape[0], num_outputs), jnp.float32)
  return out.at[rows, columns].add(jnp.asarray(values, jnp.float32))


def residual_estimate(weights, values, columns=None, num_outputs: int | None = None):
  """``sum_i w_i r_i`` for weights ``[q, k]``.

  Dense rows: ``values [q, k, C]``. Sparse rows: ``values`` and ``columns`` ``[q, k, m]`` and
  ``num_outputs`` = C; the weighted entries are scattered without densifying each neighbour.
  """
  weights = jnp.asarray(weights, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  if columns is None:
    return jnp.einsum("qk,qkc->qc", weights, values, precision=jax.lax.Precision.HIGHEST)
  if num_outputs is None:
    raise ValueError("sparse residual rows need num_outputs")
  q = values.shape[0]
  weighted = (weights[..., None] * values).reshape(q, -1)
  return scatter_rows(jnp.asarray(columns).reshape(q, -1), weighted, num_outputs)


def resmem_prediction(base, weights, values, columns=None):
  """ResMem's prediction ``base + sum_i w_i r_i`` (``base`` is ``p = softmax(z / T)``)."""
  base = jnp.asarray(base, jnp.float32)
  return base + residual_estimate(weights, values, columns, base.shape[-1])


def knn_distribution(weights, neighbour_labels, num_classes: int):
  """The neighbours' label distribution ``p_knn(v) = sum_i w_i [label_i == v]``."""
  return scatter_rows(neighbour_labels, weights, num_classes)


def knnlm_mixture(p_knn, base, lam):
  """kNN-LM's prediction ``lam * p_knn + (1 - lam) * p``."""
  return lam * p_knn + (1.0 - lam) * jnp.asarray(base, jnp.float32)


def resmem_probabilities(prediction, base_1, mix):
  """ResMem's probability output: ``(1 - m) * n + m * p_1``, whose argmax is ResMem's class.

  ``prediction`` is ``p + r`` ``[q, C]``, ``base_1`` the base model's ``softmax(z)`` (T = 1),
  ``n = normalize(max(p + r, 0))`` (one-hot on ResMem's class if no entry is positive). Per row,
  ``m = min(mix, m_tie / 2)``, where ``m_tie`` is the mix at which the base model would first tie
  another class with ResMem's class ``a = argmax(p + r)`` (ties to the lowest index, as argmax):
  where the base agrees with ResMem nothing changes, where it disagrees the row keeps at least
  half of ``n``'s margin for ``a``. Each row is a distribution with argmax ``a``.
  """
  prediction = jnp.asarray(prediction, jnp.float32)
  base_1 = jnp.asarray(base_1, jnp.float32)
  num_classes = prediction.shape[-1]
  chosen = jnp.argmax(prediction, axis=-1)
  onehot = jax.nn.one_hot(chosen, num_classes, dtype=jnp.float32)
  positive = jnp.maximum(prediction, 0.0)
  total = jnp.sum(positive, axis=-1, keepdims=True)
  normalized = jnp.where(total > 0, positive / jnp.where(total > 0, total, 1.0), onehot)
  pick = lambda x: jnp.take_along_axis(x, chosen[..., None], axis=-1)
  # The margin of a over class j, q_a - q_j = dn + m (dp - dn), is linear in m; it reaches 0 for
  # some m in [0, 1] only where the base ranks j at least as high as a (dp <= 0).
  dn = pick(normalized) - normalized
  dp = pick(base_1) - base_1
  # a's own column is excluded by index: under jit its dn can come out as a rounding error
  # rather than 0.
  overturns = (dp <= 0) & (dn > dp) & (onehot == 0)
  tie = jnp.where(overturns, dn / jnp.where(overturns, dn - dp, 1.0), jnp.inf)
  m = jnp.minimum(jnp.asarray(mix, jnp.float32), 0.5 * jnp.min(tie, axis=-1, keepdims=True))
  mixed = (1.0 - m) * normalized + m * base_1
  # Float rounding can still tie a row whose margins are near 1e-7: it becomes (onehot(a) + n) / 2.
  kept = jnp.argmax(mixed, axis=-1) == chosen
  return jnp.where(kept[..., None], mixed, 0.5 * onehot + 0.5 * normalized)
