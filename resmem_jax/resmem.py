"""The ResMem soft k-nearest-neighbour estimate, as small pure (jittable) functions.

Given the Euclidean distances ``d_i`` from a query to its k nearest memory keys and their stored
residuals ``r_i``: weights ``w_i = softmax_i(-d_i / sigma)``, estimate ``r(x) = sum_i w_i r_i``,
ResMem prediction ``p(x) + r(x)``. As ``sigma -> 0`` the weights become one-hot on the nearest key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_sigma(sigma) -> None:
  """Raises ValueError unless ``sigma`` is a positive finite number (skipped for traced values)."""
  if isinstance(sigma, jax.core.Tracer):
    return
  values = np.asarray(sigma, dtype=np.float64) if np.ndim(sigma) else np.float64(_as_float(sigma))
  if not np.all(np.isfinite(values)) or np.any(values <= 0):
    raise ValueError(f"sigma must be positive and finite, got {sigma!r}")


def _as_float(value) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f"sigma must be a positive number, got {value!r}") from None


def neighbour_weights(distances, sigma):
  """``softmax(-distances / sigma)`` over the last (neighbour) axis, float32."""
  check_sigma(sigma)
  distances = jnp.asarray(distances, jnp.float32)
  return jax.nn.softmax(-distances / jnp.asarray(sigma, jnp.float32), axis=-1)


def residual_estimate(weights, neighbour_residuals):
  """``sum_i w_i r_i``: weights ``[..., k]``, residuals ``[..., k, C]`` -> ``[..., C]``."""
  weights = jnp.asarray(weights, jnp.float32)
  neighbour_residuals = jnp.asarray(neighbour_residuals, jnp.float32)
  return jnp.einsum("...k,...kc->...c", weights, neighbour_residuals,
                    precision=jax.lax.Precision.HIGHEST)


def resmem_prediction(base, weights, neighbour_residuals):
  """ResMem prediction ``base + sum_i w_i r_i``."""
  return jnp.asarray(base, jnp.float32) + residual_estimate(weights, neighbour_residuals)
