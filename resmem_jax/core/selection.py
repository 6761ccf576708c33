"""Choosing k, sigma and T (and kNN-LM's lambda) on the validation split.

One neighbour query at the largest k gives each validation row its distances and memory ids;
every grid point then re-weights a prefix of those neighbours (neighbours are sorted, so the
first k are the k nearest). The temperature changes the stored residuals, so the caller supplies
the neighbours' residual rows at each T; neighbour identities do not depend on T. Rows arrive in
chunks (a vocabulary-sized prediction per row does not fit for all rows at once) and the sweep
accumulates sums, so the result does not depend on how the rows were chunked.

ResMem's accuracy and squared loss are those of the vector p + r; its log loss is that of its
probability output (``predictor.resmem_probabilities``), at the base-model mix of ``mix_grid`` that
gives each grid point its lowest validation log loss.

Criteria (``best(points, by)``): ``squared_loss`` (lowest; a proper scoring rule that varies
smoothly with the grid, less noisy than 0-1 accuracy), ``accuracy`` (highest; ties: lower log
loss) or ``log_loss`` (lowest). Remaining ties go to the smaller k (cheaper queries).
:func:`gain_p_value` says how significantly a point beats the base model itself on the criterion.
The p-value of the *chosen* point on the rows it was chosen on is optimistic (the best of many grid
points looks better than it is), so :meth:`SelectionSweep.held_out_p_value` splits the validation
rows into two folds (alternate rows), chooses on each and scores the choice on the other, and tests
the gain over the base model on those held-out scores of every row (cross-fitting). Where that is
not significant the engine declines to memorize and ResMem is the base model.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax.core import metrics
from resmem_jax.core import predictor

CRITERIA = ("squared_loss", "accuracy", "log_loss")
CRITERIA_COLUMN = {"accuracy": 0, "squared_loss": 1, "log_loss": 2}  # in GridPoint.diff_squares
# The rule that decides whether to memorize, in words; part of a saved choice's key, so a saved
# choice made under another rule is made again.
GATE_RULE = ("cross-fitted: choose on one half of validation (alternate rows), score on the other, "
             "both ways; one paired z-test on all held-out rows")
_SUMS = ("hit", "squared_loss", "log_loss")


@dataclasses.dataclass(frozen=True)
class GridPoint:
  """One setting and its validation scores (means over rows)."""
  k: int
  sigma: float  # absolute
  temperature: float
  accuracy: float
  squared_loss: float
  log_loss: float
  knn_lambda: float | None = None  # set on kNN-LM points
  base_mix: float | None = None  # ResMem points: the probability output's mix with the base
  # ResMem points: mean squared per-row difference from the base model of (hit, squared loss,
  # log loss), for the significance of a gain (:func:`gain_p_value`).
  diff_squares: tuple[float, float, float] | None = None


def _row_sums(pred, labels, mask):
  rows = metrics.per_row(pred, labels)
  return jnp.stack([jnp.sum(rows[name] * mask) for name in _SUMS])


@functools.partial(jax.jit, static_argnames=("k_grid", "num_classes"))
def _score_chunk(distances, values, columns, logits, labels, mask, neighbour_labels,
                 temperature, sigmas, mixes, lambdas, *, k_grid, num_classes):
  """Sums over the chunk's rows, per fold (``mask`` ``[2, q]``: each fold's real rows). ResMem
  ``[len(k_grid), S, 2, 2 * (2 + M)]``: hits and squared loss of p + r, the log loss of the
  probability output at each base mix, then the same values' squared differences from the base
  model's; kNN-LM (when ``lambdas`` is given) ``[len(k_grid), S, L, 3]`` over both folds: hits,
  squared loss, log loss."""
  both = mask.sum(axis=0)
  base = predictor.base_prediction(logits, temperature)
  base_1 = predictor.base_prediction(logits, 1.0)
  base_rows = metrics.per_row(base_1, labels)
  resmem_out, knn_out = [], []
  for k in k_grid:
    d, v = distances[:, :k], values[:, :k]
    c = None if columns is None else columns[:, :k]

    def per_sigma(sigma, d=d, v=v, c=c, k=k):
      w = predictor.neighbour_weights(d, sigma)
      pred = predictor.resmem_prediction(base, w, v, c)
      rows = metrics.per_row(pred, labels)
      row_log_losses = jax.vmap(lambda mix: metrics.per_row(
          predictor.resmem_probabilities(pred, base_1, mix), labels)["log_loss"])(mixes)  # [M, q]
      values = jnp.concatenate([jnp.stack([rows["hit"], rows["squared_loss"]]), row_log_losses])
      # Per-row differences from the base model, squared: their spread tests a gain's significance.
      base_values = jnp.stack([base_rows["hit"], base_rows["squared_loss"]]
                              + [base_rows["log_loss"]] * row_log_losses.shape[0])
      resmem = jnp.concatenate([values @ mask.T, ((values - base_values) ** 2) @ mask.T]).T
      if lambdas is None:
        return resmem, jnp.zeros((0, 3))
      p_knn = predictor.knn_distribution(w, neighbour_labels[:, :k], num_classes)
      knn = jax.vmap(lambda lam: _row_sums(predictor.knnlm_mixture(p_knn, base, lam),
                                           labels, both))(lambdas)
      return resmem, knn

    resmem, knn = jax.vmap(per_sigma)(sigmas)
    resmem_out.append(resmem)
    knn_out.append(knn)
  return jnp.stack(resmem_out), jnp.stack(knn_out)


@jax.jit
def _base_sums(logits, labels, mask):
  """The base model's sums per fold, ``[2, 3]``."""
  base = predictor.base_prediction(logits, 1.0)
  return jax.vmap(lambda m: _row_sums(base, labels, m))(mask)


def _check_grid(name: str, values, high: float | None = None) -> tuple:
  values = tuple(float(v) for v in values)
  if not values:
    raise ValueError(f"{name} is empty")
  for v in values:
    if not np.isfinite(v) or v <= 0 or (high is not None and v > high):
      raise ValueError(f"{name} values must be finite and in (0, {high or 'inf'}], got {values}")
  return values


# neighbour_rows(temperature, ids [c, k]) -> (values [c, k, m], columns [c, k, m] or None)
NeighbourRows = Callable[[float, np.ndarray], tuple]


class SelectionSweep:
  """Accumulates the validation scores of every grid point over chunks of validation rows.

  Args:
    k_grid, sigma_grid (absolute), temperature_grid: the ResMem grid.
    num_classes: C, the width of a prediction row.
    lambda_grid: kNN-LM mixture weights; None scores ResMem only.
    max_elements: bounds the floats held per jitted chunk (rows x grid x C).
  """

  def __init__(self, *, k_grid: Sequence[int], sigma_grid: Sequence[float],
               temperature_grid: Sequence[float], num_classes: int,
               mix_grid: Sequence[float] = (1.0,), lambda_grid: Sequence[float] | None = None,
               max_elements: int = 1 << 24):
    self.k_grid = tuple(sorted({int(k) for k in _check_grid("k_grid", k_grid)}))
    self.sigma_grid = _check_grid("sigma_grid", sigma_grid)
    self.temperature_grid = _check_grid("temperature_grid", temperature_grid)
    self.lambda_grid = None if lambda_grid is None else _check_grid("knn_lambda_grid", lambda_grid, 1.0)
    self.mix_grid = _check_mixes(mix_grid)
    self.num_classes = int(num_classes)
    self.max_elements = int(max_elements)
    shape = (len(self.temperature_grid), len(self.k_grid), len(self.sigma_grid))
    # Sums per fold: validation row i belongs to fold i % 2 (see held_out_p_value).
    self._resmem = np.zeros(shape + (2, 2 * (2 + len(self.mix_grid))))
    self._knn = np.zeros(shape + (len(self.lambda_grid or ()), 3))
    self._base = np.zeros((2, 3))
    self.fold_counts = np.zeros(2, np.int64)
    self.count = 0

  @property
  def k_max(self) -> int:
    return self.k_grid[-1]

  def _chunk_rows(self, q: int, width: int) -> int:
    heads = len(self.sigma_grid) * (len(self.lambda_grid or ()) + len(self.mix_grid) + 2)
    per_row = self.k_max * width + heads * self.num_classes
    rows = max(8, self.max_elements // max(1, per_row))
    return int(min(rows, -(-q // 8) * 8))

  def add(self, distances, ids, logits, labels, neighbour_rows: NeighbourRows,
          neighbour_labels=None) -> None:
    """Scores validation rows given their nearest memory entries (ascending, >= k_max of them).

    ``neighbour_labels [q, K]`` (the memory entries' labels) is needed for kNN-LM.
    """
    distances = np.asarray(distances, np.float32)
    ids = np.asarray(ids)
    logits = np.asarray(logits, np.float32)
    labels = np.asarray(labels, np.int32)
    q = labels.shape[0]
    if distances.shape != ids.shape or distances.ndim != 2 or distances.shape[0] != q:
      raise ValueError(f"distances {distances.shape} and ids {ids.shape} must be [{q}, K]")
    if distances.shape[1] < self.k_max:
      raise ValueError(f"k_grid reaches {self.k_max} but only {distances.shape[1]} neighbours "
                       "were searched")
    if logits.shape != (q, self.num_classes):
      raise ValueError(f"logits have shape {logits.shape}, expected ({q}, {self.num_classes})")
    if self.lambda_grid is not None and neighbour_labels is None:
      raise ValueError("kNN-LM scores need the neighbours' labels")
    if q == 0:
      return
    ids, distances = ids[:, :self.k_max], distances[:, :self.k_max]
    sigmas = jnp.asarray(self.sigma_grid, jnp.float32)
    mixes = jnp.asarray(self.mix_grid, jnp.float32)
    lambdas = None if self.lambda_grid is None else jnp.asarray(self.lambda_grid, jnp.float32)
    # Chunk size from one row's width (dense C or sparse m); every chunk is padded to it, so
    # each shape compiles once.
    probe_values, _ = neighbour_rows(self.temperature_grid[0], ids[:1])
    chunk = self._chunk_rows(q, np.shape(probe_values)[-1])
    for start in range(0, q, chunk):
      for t_index, temperature in enumerate(self.temperature_grid):
        rows = slice(start, min(q, start + chunk))
        values, columns = neighbour_rows(temperature, ids[rows])
        pad = lambda x: None if x is None else _pad(np.asarray(x), chunk)
        nb_labels = None if lambdas is None else pad(np.asarray(neighbour_labels)[rows, :self.k_max])
        fold = (self.count + np.arange(rows.start, rows.stop)) % 2
        mask = np.stack([pad((fold == f).astype(np.float32)) for f in (0, 1)])
        resmem, knn = _score_chunk(
            pad(distances[rows]), pad(np.asarray(values, np.float32)),
            None if columns is None else pad(np.asarray(columns, np.int32)),
            pad(logits[rows]), pad(labels[rows]), mask, nb_labels, jnp.float32(temperature),
            sigmas, mixes, lambdas, k_grid=self.k_grid, num_classes=self.num_classes)
        self._resmem[t_index] += np.asarray(resmem, np.float64)
        if lambdas is not None:
          self._knn[t_index] += np.asarray(knn, np.float64)
        if t_index == 0:
          self._base += np.asarray(_base_sums(pad(logits[rows]), pad(labels[rows]), mask))
    self.fold_counts += np.bincount((self.count + np.arange(q)) % 2, minlength=2)
    self.count += q

  def _folds(self, fold: int | None) -> tuple[slice | int, int]:
    if fold is None:
      return slice(None), self.count
    return fold, int(self.fold_counts[fold])

  def _point(self, ti: int, ki: int, si: int, fold: int | None, mix: int | None = None):
    """The ResMem grid point on ``fold`` (None: all rows), at base mix index ``mix`` (None: the
    one with the lowest log loss on those rows)."""
    where, count = self._folds(fold)
    sums, squares = np.split(np.sum(np.atleast_2d(self._resmem[ti, ki, si, where]), axis=0)
                             / max(count, 1), 2)
    hits, squared, *log_losses = sums
    if mix is None:
      mix = int(np.argmin(log_losses))  # ties: the first, i.e. the least base
    diff_squares = (float(squares[0]), float(squares[1]), float(squares[2 + mix]))
    return GridPoint(self.k_grid[ki], self.sigma_grid[si], self.temperature_grid[ti],
                     float(hits), float(squared), float(log_losses[mix]),
                     base_mix=self.mix_grid[mix], diff_squares=diff_squares)

  def points(self, fold: int | None = None) -> tuple[list[GridPoint], list[GridPoint]]:
    """(ResMem points, kNN-LM points) with mean scores over all rows (or one fold's, ResMem
    only); kNN-LM's list is empty without lambdas."""
    if self.count == 0:
      raise ValueError("the validation sweep saw no rows")
    resmem, knn = [], []
    for ti, t in enumerate(self.temperature_grid):
      for ki, k in enumerate(self.k_grid):
        for si, s in enumerate(self.sigma_grid):
          resmem.append(self._point(ti, ki, si, fold))
          for li, lam in enumerate(self.lambda_grid or () if fold is None else ()):
            knn.append(GridPoint(k, s, t, *(self._knn[ti, ki, si, li] / self.count),
                                 knn_lambda=lam))
    return resmem, knn

  def base_scores(self, fold: int | None = None) -> dict:
    """The base model's (T = 1) validation accuracy, squared loss and log loss (all rows or one
    fold's)."""
    if self.count == 0:
      raise ValueError("the validation sweep saw no rows")
    where, count = self._folds(fold)
    hit, squared, log_loss = np.sum(np.atleast_2d(self._base[where]), axis=0) / max(count, 1)
    return {"accuracy": float(hit), "squared_loss": float(squared), "log_loss": float(log_loss)}

  def held_out_p_value(self, by: str = "squared_loss") -> float:
    """How significantly choosing by ``by`` beats the base model on rows it was not chosen on.

    Cross-fitting: the point chosen on fold 0 is scored on fold 1's rows and the point chosen on
    fold 1 on fold 0's, so every validation row gives one held-out difference from the base
    model; the one-sided paired z-test of :func:`gain_p_value` runs on all of them. 1 when a fold
    is empty or the held-out gain is not positive.
    """
    if min(self.fold_counts) == 0:
      return 1.0
    if by not in CRITERIA:
      raise ValueError(f"selection criterion must be one of {CRITERIA}, got {by!r}")
    column = CRITERIA_COLUMN[by]
    sign = 1.0 if by == "accuracy" else -1.0  # improvement per row: more hits, less loss
    gain = squares = 0.0
    for chosen_on, tested_on in ((0, 1), (1, 0)):
      chosen = best(self.points(chosen_on)[0], by)
      index = (self.temperature_grid.index(chosen.temperature), self.k_grid.index(chosen.k),
               self.sigma_grid.index(chosen.sigma))
      held = self._point(*index, tested_on, mix=self.mix_grid.index(chosen.base_mix))
      share = self.fold_counts[tested_on] / self.count
      gain += share * sign * (getattr(held, by) - self.base_scores(tested_on)[by])
      squares += share * held.diff_squares[column]
    return _paired_z_p_value(gain, squares, self.count)


def _check_mixes(values) -> tuple:
  values = tuple(float(v) for v in values)
  if not values or any(not np.isfinite(v) or not 0 <= v <= 1 for v in values):
    raise ValueError(f"base_mix_grid must hold values in [0, 1], got {values}")
  return values


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
  extra = rows - x.shape[0]
  return x if extra == 0 else np.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))


def best(points: Sequence[GridPoint], by: str = "squared_loss") -> GridPoint:
  """The grid point chosen by criterion ``by`` (see the module docstring)."""
  if not points:
    raise ValueError("no grid points to choose from")
  r = lambda x: round(float(x), 9)
  keys = {
      "squared_loss": lambda p: (r(p.squared_loss), -r(p.accuracy), p.k),
      "accuracy": lambda p: (-r(p.accuracy), r(p.log_loss), p.k),
      "log_loss": lambda p: (r(p.log_loss), -r(p.accuracy), p.k),
  }
  if by not in keys:
    raise ValueError(f"selection criterion must be one of {CRITERIA}, got {by!r}")
  return min(points, key=keys[by])


def _paired_z_p_value(gain: float, mean_square: float, rows: int) -> float:
  """One-sided p-value of a mean per-row improvement ``gain`` whose per-row differences have mean
  square ``mean_square`` (normal approximation; 1 when there is no improvement at all)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if round(gain, 12) <= 0:
    return 1.0
  variance = max(mean_square - gain * gain, 0.0)
  if variance == 0.0:
    return 0.0
  return float(stats.norm.sf(gain / np.sqrt(variance / rows)))


def gain_p_value(point: GridPoint, base: dict, by: str, rows: int) -> float:
  """One-sided p-value that ``point`` beats the base model on criterion ``by`` over ``rows``
  validation rows: a paired z-test on the per-row differences (normal approximation; 1 when the
  point is not better at all)."""
  if by not in CRITERIA:
    raise ValueError(f"selection criterion must be one of {CRITERIA}, got {by!r}")
  sign = 1.0 if by == "accuracy" else -1.0  # improvement per row: more hits, less loss
  return _paired_z_p_value(sign * (getattr(point, by) - base[by]),
                           point.diff_squares[CRITERIA_COLUMN[by]], rows)
