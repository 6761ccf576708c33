"""Training residuals, the values ResMem stores beside each key.

Classification: ``r_i = onehot(y_i) - softmax(z(x_i) / T)``, the part of the label the base model
does not explain at temperature T. Regression: ``r_i = y_i - f(x_i)``. The sparse top-m form keeps
the label's entry and the m most negative entries (the m largest other probabilities); every other
entry is taken as 0, so each entry is off by at most the (m+1)-th largest probability.

``residuals`` / ``regression_residuals`` are the checked host API (NumPy in, NumPy out);
``classification_residuals`` / ``sparse_top_m`` are the jittable forms used inside passes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax.core import predictor


def classification_residuals(labels, logits, temperature):
  """``onehot(labels) - softmax(logits / T)``, float32 ``[..., C]`` (jittable)."""
  probs = predictor.base_prediction(logits, temperature)
  return jax.nn.one_hot(labels, probs.shape[-1], dtype=jnp.float32) - probs


def sparse_top_m(residuals, top_m: int, labels=None):
  """Sparse form of classification residuals ``[..., C]``: ``(columns int32, values float32)``.

  Column 0 is the label (``labels``, or the argmax of each row: the only positive entry), then the
  ``min(top_m, C - 1)`` most negative entries of the other columns. Jittable.
  """
  residuals = jnp.asarray(residuals, jnp.float32)
  num_classes = residuals.shape[-1]
  m = min(int(top_m), num_classes - 1)
  label = jnp.argmax(residuals, axis=-1) if labels is None else jnp.asarray(labels)
  label = label.astype(jnp.int32)
  label_value = jnp.take_along_axis(residuals, label[..., None], axis=-1)
  columns, values = [label[..., None]], [label_value]
  if m > 0:
    is_label = jax.nn.one_hot(label, num_classes, dtype=jnp.bool_)
    neg_values, others = jax.lax.top_k(jnp.where(is_label, -jnp.inf, -residuals), m)
    columns.append(others.astype(jnp.int32))
    values.append(-neg_values)
  return jnp.concatenate(columns, axis=-1), jnp.concatenate(values, axis=-1)


def _numeric(value, name: str, ndim: int | None = None) -> np.ndarray:
  array = np.asarray(value)
  if array.dtype == object or not (np.issubdtype(array.dtype, np.number)
                                   or array.dtype == jnp.bfloat16):
    raise ValueError(f"{name} must be a numeric array, got dtype {array.dtype}")
  if np.iscomplexobj(array):  # a cast to float32 would drop the imaginary part
    raise ValueError(f"{name} must be real numbers, got complex dtype {array.dtype}; pass the "
                     "real part (np.real) or the magnitude (np.abs) explicitly")
  if ndim is not None and array.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
  if (np.issubdtype(array.dtype, np.inexact) or array.dtype == jnp.bfloat16) and \
      not np.all(np.isfinite(array.astype(np.float32))):
    raise ValueError(f"{name} contains NaN or inf")
  return array


_classification_residuals_jit = jax.jit(classification_residuals)


def residuals(labels, logits, temperature=1.0) -> np.ndarray:
  """``onehot(labels) - softmax(logits / temperature)`` as float32 ``[n, C]``, inputs checked.

  Args:
    labels: integer class ids ``[n]`` in ``[0, C)``.
    logits: base-model logits ``[n, C]`` (floating point, finite).
    temperature: softmax temperature ``T > 0``.
  """
  temperature = predictor.check_positive(temperature, "temperature")
  logits = _numeric(logits, "logits", ndim=2)
  if not (np.issubdtype(logits.dtype, np.floating) or logits.dtype == jnp.bfloat16):
    raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} "
                     f"dtype {labels.dtype}")
  if labels.shape[0] != logits.shape[0]:
    raise ValueError(f"labels has {labels.shape[0]} entries but logits has {logits.shape[0]} rows")
  num_classes = logits.shape[1]
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  return np.asarray(_classification_residuals_jit(labels.astype(np.int32), logits,
                                                  np.float32(temperature)))


def regression_residuals(targets, predictions) -> np.ndarray:
  """``targets - predictions`` as float32; 1-D inputs become ``[n, 1]``."""
  targets = _numeric(targets, "targets")
  predictions = _numeric(predictions, "predictions")
  if targets.shape != predictions.shape:
    raise ValueError(f"targets shape {targets.shape} differs from predictions shape "
                     f"{predictions.shape}")
  if targets.ndim not in (1, 2):
    raise ValueError(f"targets must be [n] or [n, outputs], got shape {targets.shape}")
  diff = targets.astype(np.float32) - predictions.astype(np.float32)
  return diff[:, None] if diff.ndim == 1 else diff
