"""Choosing ResMem's k, sigma and temperature T on the validation split.

One neighbour query at the largest k gives distances and indices for every validation example;
each grid point then only re-weights the first k of those neighbours (no re-query). The
temperature changes the stored residuals ``onehot(y_j) - softmax(z_j / T)``, so the neighbours'
residuals are recomputed from the training logits and labels for each T; neighbour identities do
not depend on T.

Selection (``by``): ``"squared_loss"`` (default) picks the lowest validation squared loss of the
prediction vector against the one-hot target, ``"accuracy"`` the highest validation accuracy.
Squared loss is a proper scoring rule and varies smoothly with (k, sigma, T), so it is a less noisy
criterion than 0-1 accuracy: on MNIST MLPs it chose points with higher *test* accuracy than
selection by validation accuracy (BUILD_NOTES.md). Ties go to the smaller k (cheaper queries).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class GridPoint:
  k: int
  sigma: float
  temperature: float
  accuracy: float
  squared_loss: float


def _check_grid(name: str, values: Sequence[float], positive: bool = True) -> list:
  values = list(values)
  if not values:
    raise ValueError(f"{name} is empty")
  if positive and any(not np.isfinite(v) or v <= 0 for v in values):
    raise ValueError(f"{name} must contain finite values > 0, got {values}")
  return values


@jax.jit
def _score_chunk(distances, nb_logits, nb_labels, val_logits, val_labels, mask, temperature, sigmas):
  """Correct-prediction counts and squared-loss sums for every sigma, for one k and one chunk.

  distances: [q, k]; nb_logits: [q, k, C]; nb_labels: [q, k]; val_logits: [q, C]; mask: [q].
  Returns (correct [S], squared [S]).
  """
  num_classes = val_logits.shape[-1]
  nb_res = jax.nn.one_hot(nb_labels, num_classes) - jax.nn.softmax(nb_logits / temperature, -1)
  base = jax.nn.softmax(val_logits / temperature, -1)
  target = jax.nn.one_hot(val_labels, num_classes)

  def per_sigma(sigma):
    # softmax(-d / sigma); subtracting the row max keeps tiny sigma finite (weight 1 on the nearest).
    w = jax.nn.softmax(-distances / sigma, axis=-1)
    pred = base + jnp.einsum("qk,qkc->qc", w, nb_res)
    correct = jnp.sum((jnp.argmax(pred, -1) == val_labels) * mask)
    squared = jnp.sum(jnp.sum((pred - target) ** 2, -1) * mask)
    return correct, squared

  return jax.vmap(per_sigma)(sigmas)


def sweep(distances: np.ndarray, indices: np.ndarray, train_logits: np.ndarray,
          train_labels: np.ndarray, val_logits: np.ndarray, val_labels: np.ndarray, *,
          k_grid: Sequence[int], sigma_grid: Sequence[float],
          temperature_grid: Sequence[float], chunk_elements: int = 1 << 24) -> list[GridPoint]:
  """Validation accuracy and squared loss of ResMem at every (k, sigma, T) of the grid.

  ``distances``/``indices`` ([q, K], ascending) are the K = max(k_grid) nearest training points of
  each validation example.
  """
  distances = np.asarray(distances, np.float32)
  indices = np.asarray(indices)
  if distances.shape != indices.shape or distances.ndim != 2:
    raise ValueError(f"distances {distances.shape} and indices {indices.shape} must be equal 2-D shapes")
  q, kmax = distances.shape
  k_grid = sorted(int(k) for k in _check_grid("k_grid", k_grid))
  if k_grid[-1] > kmax:
    raise ValueError(f"k_grid max {k_grid[-1]} exceeds the {kmax} neighbours searched")
  sigma_grid = [float(s) for s in _check_grid("sigma_grid", sigma_grid)]
  temperature_grid = [float(t) for t in _check_grid("temperature_grid", temperature_grid)]
  num_classes = train_logits.shape[-1]
  if val_logits.shape != (q, num_classes):
    raise ValueError(f"val_logits shape {val_logits.shape} != ({q}, {num_classes})")

  sigmas = jnp.asarray(sigma_grid, jnp.float32)
  chunk = max(8, chunk_elements // max(1, kmax * num_classes * len(sigma_grid)))
  chunk = min(chunk, q)
  # Pad to a whole number of chunks so each jitted shape compiles once.
  padded = -(-q // chunk) * chunk
  pad = padded - q
  d_all = np.pad(distances, ((0, pad), (0, 0)))
  i_all = np.pad(indices, ((0, pad), (0, 0)))
  vl_all = np.pad(np.asarray(val_logits, np.float32), ((0, pad), (0, 0)))
  vy_all = np.pad(np.asarray(val_labels), (0, pad))
  m_all = np.pad(np.ones(q, np.float32), (0, pad))

  results = []
  for temperature in temperature_grid:
    totals = {k: [np.zeros(len(sigma_grid)), np.zeros(len(sigma_grid))] for k in k_grid}
    for start in range(0, padded, chunk):
      sl = slice(start, start + chunk)
      nb_idx = i_all[sl]
      nb_logits = np.asarray(train_logits[nb_idx], np.float32)
      nb_labels = np.asarray(train_labels[nb_idx])
      for k in k_grid:
        correct, squared = _score_chunk(
            d_all[sl, :k], nb_logits[:, :k], nb_labels[:, :k], vl_all[sl], vy_all[sl], m_all[sl],
            jnp.float32(temperature), sigmas)
        totals[k][0] += np.asarray(correct)
        totals[k][1] += np.asarray(squared)
    for k in k_grid:
      for s_i, sigma in enumerate(sigma_grid):
        results.append(GridPoint(k=k, sigma=sigma, temperature=temperature,
                                 accuracy=float(totals[k][0][s_i] / q),
                                 squared_loss=float(totals[k][1][s_i] / q)))
  return results


SELECTION_CRITERIA = ("squared_loss", "accuracy")


def best(points: Sequence[GridPoint], by: str = "squared_loss") -> GridPoint:
  """The grid point chosen by criterion ``by`` (see the module docstring)."""
  if not points:
    raise ValueError("no grid points to choose from")
  if by == "squared_loss":
    return min(points, key=lambda p: (round(p.squared_loss, 9), -round(p.accuracy, 9), p.k))
  if by == "accuracy":
    return min(points, key=lambda p: (-round(p.accuracy, 9), round(p.squared_loss, 9), p.k))
  raise ValueError(f"selection criterion must be one of {SELECTION_CRITERIA}, got {by!r}")
