"""Training residuals stored in the ResMem memory.

Classification: ``r_i = onehot(y_i) - softmax(z(x_i) / T)``, the part of the label the base model
does not explain at temperature ``T``. Regression: ``r_i = y_i - f(x_i)``. Both return float32.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import jax
import jax.numpy as jnp


def _finite_array(value, name: str, ndim: int | None = None) -> np.ndarray:
  array = np.asarray(value)
  if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == jnp.bfloat16):
    raise ValueError(f"{name} must be a numeric array, got dtype {array.dtype}")
  if ndim is not None and array.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
  if np.issubdtype(array.dtype, np.inexact) or array.dtype == jnp.bfloat16:
    if not np.all(np.isfinite(array.astype(np.float32))):
      raise ValueError(f"{name} contains NaN or inf")
  return array


def _check_temperature(temperature) -> float:
  try:
    value = float(temperature)
  except (TypeError, ValueError):
    raise ValueError(f"temperature must be a positive number, got {temperature!r}") from None
  if not np.isfinite(value) or value <= 0:
    raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
  return value


@jax.jit
def _classification_residuals(labels, logits, temperature):
  probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32) - probs


def residuals(labels, logits, temperature=1.0) -> np.ndarray:
  """``onehot(labels) - softmax(logits / temperature)`` as float32 ``[n, C]``.

  Args:
    labels: integer class ids ``[n]`` in ``[0, C)``.
    logits: base-model logits ``[n, C]`` (float).
    temperature: softmax temperature ``T > 0``.
  """
  temperature = _check_temperature(temperature)
  logits = _finite_array(logits, "logits", ndim=2)
  if not np.issubdtype(logits.dtype, np.floating) and logits.dtype != jnp.bfloat16:
    raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
  if labels.shape[0] != logits.shape[0]:
    raise ValueError(f"labels has {labels.shape[0]} entries but logits has {logits.shape[0]} rows")
  num_classes = logits.shape[1]
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
  return np.asarray(_classification_residuals(labels.astype(np.int32), logits, np.float32(temperature)))


def regression_residuals(targets, predictions) -> np.ndarray:
  """``targets - predictions`` as float32; 1-D inputs become ``[n, 1]``."""
  targets = _finite_array(targets, "targets")
  predictions = _finite_array(predictions, "predictions")
  if targets.shape != predictions.shape:
    raise ValueError(f"targets shape {targets.shape} differs from predictions shape {predictions.shape}")
  if targets.ndim not in (1, 2):
    raise ValueError(f"targets must be [n] or [n, outputs], got shape {targets.shape}")
  diff = targets.astype(np.float32) - predictions.astype(np.float32)
  return diff[:, None] if diff.ndim == 1 else diff


class _CallableModule(types.ModuleType):
  """Lets ``resmem_jax.residuals(...)`` call the function even after this module is imported.

  Importing ``resmem_jax.residuals`` binds the *module* as the package attribute ``residuals``,
  shadowing the package's lazy export of the function of the same name; making the module
  callable (forwarding to :func:`residuals`) keeps both spellings working in any import order.
  """

  def __call__(self, labels, logits, temperature=1.0):
    return residuals(labels, logits, temperature)


sys.modules[__name__].__class__ = _CallableModule
