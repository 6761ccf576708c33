"""Choosing k, sigma and T (and kNN-LM's lambda) on the validation split.

One neighbour query at the largest k gives each validation row its distances and memory ids;
every grid point then re-weights a prefix of those neighbours (neighbours are sorted, so the
first k are the k nearest). The temperature changes the stored residuals, so the caller supplies
the neighbours' residual rows at each T; neighbour identities do not depend on T. Rows arrive in
chunks (a vocabulary-sized prediction per row does not fit for all rows at once) and the sweep
accumulates sums, so the result does not depend on how the rows were chunked.

ResMem's accuracy and squared loss are those of the vector p + r; its log loss is that of its
probability output (``predictor.resmem_probabilities``), at the base-model mix of ``mix_grid`` that
gives each grid point its lowest validation log loss. The base model is scored at every T of the
grid too (temperature scaling alone, without a memory).

Criteria (``best(points, by)``): ``squared_loss`` (lowest), ``accuracy`` (highest; ties: lower log
loss) or ``log_loss`` (lowest). Remaining ties go to the smaller k (cheaper queries).

Sums are kept per fold: validation rows are dealt to two folds in blocks of ``fold_block``
consecutive rows (1 for images; a sequence's tokens for a language model, so that the folds share
no sequence). The folds serve the opt-in gate (``core/gate.py``: choose on one, test on the other)
and :meth:`SelectionSweep.held_out_scores`, which scores a selection rule on rows it did not
choose on (how the defaults are compared without a test split).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax.core import metrics
from resmem_jax.core import predictor
from resmem_jax.settings import SELECT_BY

CRITERIA = SELECT_BY  # resmem.select_by's choices, defined once in settings
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


def fold_of(rows: np.ndarray, fold_block: int) -> np.ndarray:
  """The fold (0 or 1) of validation rows numbered ``rows`` in stream order."""
  return (np.asarray(rows, np.int64) // int(fold_block)) % 2


def _row_sums(pred, labels, mask):
  rows = metrics.per_row(pred, labels)
  return jnp.stack([jnp.sum(rows[name] * mask) for name in _SUMS])


@functools.partial(jax.jit, static_argnames=("k_grid", "num_classes"))
def _score_chunk(distances, values, columns, logits, labels, mask, neighbour_labels,
                 temperature, sigmas, mixes, lambdas, *, k_grid, num_classes):
  """Sums over the chunk's rows, per fold (``mask`` ``[2, q]``: each fold's real rows): ResMem
  ``[len(k_grid), S, 2, 2 + M]`` (hits and squared loss of p + r, then the log loss of the
  probability output at each base mix); kNN-LM (when ``lambdas`` is given) ``[len(k_grid), S, L,
  3]`` over both folds (hits, squared loss, log loss); the base model at this temperature
  ``[2, 3]``."""
  both = mask.sum(axis=0)
  base = predictor.base_prediction(logits, temperature)
  base_1 = predictor.base_prediction(logits, 1.0)
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
      resmem = (values @ mask.T).T
      if lambdas is None:
        return resmem, jnp.zeros((0, 3))
      p_knn = predictor.knn_distribution(w, neighbour_labels[:, :k], num_classes)
      knn = jax.vmap(lambda lam: _row_sums(predictor.knnlm_mixture(p_knn, base, lam),
                                           labels, both))(lambdas)
      return resmem, knn

    resmem, knn = jax.vmap(per_sigma)(sigmas)
    resmem_out.append(resmem)
    knn_out.append(knn)
  base_sums = jax.vmap(lambda m: _row_sums(base, labels, m))(mask)
  return jnp.stack(resmem_out), jnp.stack(knn_out), base_sums


@jax.jit
def _base_1_sums(logits, labels, mask):
  """The base model's own (T = 1) sums per fold, ``[2, 3]``."""
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


def check_criterion(by: str) -> str:
  if by not in CRITERIA:
    raise ValueError(f"selection criterion must be one of {CRITERIA}, got {by!r}")
  return by


# neighbour_rows(temperature, ids [c, k]) -> (values [c, k, m], columns [c, k, m] or None)
NeighbourRows = Callable[[float, np.ndarray], tuple]


class SelectionSweep:
  """Accumulates the validation scores of every grid point over chunks of validation rows.

  Args:
    k_grid, sigma_grid (absolute), temperature_grid: the ResMem grid.
    num_classes: C, the width of a prediction row.
    mix_grid: candidate mixes of the probability output with the base model.
    lambda_grid: kNN-LM mixture weights; None scores ResMem only.
    fold_block: consecutive validation rows dealt to the same fold (:func:`fold_of`).
    max_elements: bounds the floats held per jitted chunk (rows x grid x C).
  """

  def __init__(self, *, k_grid: Sequence[int], sigma_grid: Sequence[float],
               temperature_grid: Sequence[float], num_classes: int,
               mix_grid: Sequence[float] = (1.0,), lambda_grid: Sequence[float] | None = None,
               fold_block: int = 1, max_elements: int = 1 << 24):
    self.k_grid = tuple(sorted({int(k) for k in _check_grid("k_grid", k_grid)}))
    self.sigma_grid = _check_grid("sigma_grid", sigma_grid)
    self.temperature_grid = _check_grid("temperature_grid", temperature_grid)
    self.lambda_grid = None if lambda_grid is None else _check_grid("knn_lambda_grid", lambda_grid, 1.0)
    self.mix_grid = _check_mixes(mix_grid)
    self.num_classes = int(num_classes)
    if int(fold_block) != fold_block or fold_block < 1:
      raise ValueError(f"fold_block must be a positive integer, got {fold_block!r}")
    self.fold_block = int(fold_block)
    self.max_elements = int(max_elements)
    shape = (len(self.temperature_grid), len(self.k_grid), len(self.sigma_grid))
    self._resmem = np.zeros(shape + (2, 2 + len(self.mix_grid)))  # per fold
    self._knn = np.zeros(shape + (len(self.lambda_grid or ()), 3))
    self._base = np.zeros((len(self.temperature_grid), 2, 3))  # per T and fold
    self._base_1 = np.zeros((2, 3))  # T = 1, whether or not the grid holds it
    self.fold_counts = np.zeros(2, np.int64)
    self.count = 0

  @property
  def k_max(self) -> int:
    return self.k_grid[-1]

  def _chunk_rows(self, q: int, width: int) -> int:
    heads = len(self.sigma_grid) * (len(self.lambda_grid or ()) + len(self.mix_grid) + 1)
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
    folds = fold_of(self.count + np.arange(q), self.fold_block)
    # Chunk size from one row's width (dense C or sparse m); every chunk is padded to it, so
    # each shape compiles once.
    probe_values, _ = neighbour_rows(self.temperature_grid[0], ids[:1])
    chunk = self._chunk_rows(q, np.shape(probe_values)[-1])
    for start in range(0, q, chunk):
      rows = slice(start, min(q, start + chunk))
      pad = lambda x: None if x is None else _pad(np.asarray(x), chunk)
      mask = np.stack([_pad((folds[rows] == f).astype(np.float32), chunk) for f in (0, 1)])
      nb_labels = None if lambdas is None else pad(np.asarray(neighbour_labels)[rows, :self.k_max])
      self._base_1 += np.asarray(_base_1_sums(pad(logits[rows]), pad(labels[rows]), mask))
      for t_index, temperature in enumerate(self.temperature_grid):
        values, columns = neighbour_rows(temperature, ids[rows])
        resmem, knn, base = _score_chunk(
            pad(distances[rows]), pad(np.asarray(values, np.float32)),
            None if columns is None else pad(np.asarray(columns, np.int32)),
            pad(logits[rows]), pad(labels[rows]), mask, nb_labels, jnp.float32(temperature),
            sigmas, mixes, lambdas, k_grid=self.k_grid, num_classes=self.num_classes)
        self._resmem[t_index] += np.asarray(resmem, np.float64)
        self._base[t_index] += np.asarray(base, np.float64)
        if lambdas is not None:
          self._knn[t_index] += np.asarray(knn, np.float64)
    self.fold_counts += np.bincount(folds, minlength=2)
    self.count += q

  def _rows(self, fold: int | None) -> tuple[slice | int, int]:
    if self.count == 0:
      raise ValueError("the validation sweep saw no rows")
    if fold is None:
      return slice(None), self.count
    if fold not in (0, 1):
      raise ValueError(f"fold must be 0, 1 or None, got {fold!r}")
    return fold, int(self.fold_counts[fold])

  def _point(self, ti: int, ki: int, si: int, fold: int | None, mix: int | None = None):
    """The ResMem grid point on ``fold`` (None: all rows), at base mix index ``mix`` (None: the
    one with the lowest log loss on those rows)."""
    where, count = self._rows(fold)
    hits, squared, *log_losses = (np.sum(np.atleast_2d(self._resmem[ti, ki, si, where]), axis=0)
                                  / max(count, 1))
    if mix is None:
      mix = int(np.argmin(log_losses))  # ties: the first, i.e. the least base
    return GridPoint(self.k_grid[ki], self.sigma_grid[si], self.temperature_grid[ti],
                     float(hits), float(squared), float(log_losses[mix]),
                     base_mix=self.mix_grid[mix])

  def points(self, fold: int | None = None) -> tuple[list[GridPoint], list[GridPoint]]:
    """(ResMem points, kNN-LM points) with mean scores over all rows (or one fold's, ResMem
    only); kNN-LM's list is empty without lambdas."""
    self._rows(fold)
    resmem, knn = [], []
    for ti, t in enumerate(self.temperature_grid):
      for ki, k in enumerate(self.k_grid):
        for si, s in enumerate(self.sigma_grid):
          resmem.append(self._point(ti, ki, si, fold))
          for li, lam in enumerate(self.lambda_grid or () if fold is None else ()):
            hits, squared, log_loss = self._knn[ti, ki, si, li] / self.count
            knn.append(GridPoint(k, s, t, hits, squared, log_loss, knn_lambda=lam))
    return resmem, knn

  def base_scores(self, fold: int | None = None, temperature: float = 1.0) -> dict:
    """The base model's validation accuracy, squared loss and log loss at ``temperature`` (one of
    the grid's, or 1), on all rows or one fold's."""
    where, count = self._rows(fold)
    t = float(temperature)
    if t == 1.0:
      sums = self._base_1[where]
    elif t in self.temperature_grid:
      sums = self._base[self.temperature_grid.index(t)][where]
    else:
      raise ValueError(f"temperature {t} is not in the sweep's grid {self.temperature_grid}")
    sums = np.sum(np.atleast_2d(sums), axis=0)
    hit, squared, log_loss = sums / max(count, 1)
    return {"accuracy": float(hit), "squared_loss": float(squared), "log_loss": float(log_loss)}

  def base_points(self, fold: int | None = None) -> list[GridPoint]:
    """The base model at every temperature of the grid (``k = 0``: no memory)."""
    return [GridPoint(0, 0.0, t, **self.base_scores(fold, t)) for t in self.temperature_grid]

  def held_out_scores(self, by: str, temperatures: Sequence[float] | None = None) -> dict:
    """How a selection rule does on rows it did not choose on (cross-fitting).

    The point chosen by ``by`` on one fold (among the points whose T is in ``temperatures``,
    default all) is scored on the other fold's rows, both ways; each fold's scores weigh by its
    rows. Returns ResMem's held-out ``accuracy`` / ``squared_loss`` / ``log_loss``, the same for
    the base model (T = 1) as ``base_*``, and the two choices.
    """
    check_criterion(by)
    allowed = self.temperature_grid if temperatures is None else tuple(map(float, temperatures))
    if not set(allowed) <= set(self.temperature_grid):
      raise ValueError(f"temperatures {allowed} are not all in the sweep's grid "
                       f"{self.temperature_grid}")
    if min(self.fold_counts) == 0:
      raise ValueError("held-out scores need validation rows in both folds")
    out: dict[str, Any] = {name: 0.0 for name in (
        "accuracy", "squared_loss", "log_loss", "base_accuracy", "base_squared_loss",
        "base_log_loss")}
    chosen = []
    for chosen_on, tested_on in ((0, 1), (1, 0)):
      point = best([p for p in self.points(chosen_on)[0] if p.temperature in allowed], by)
      index = (self.temperature_grid.index(point.temperature), self.k_grid.index(point.k),
               self.sigma_grid.index(point.sigma))
      held = self._point(*index, tested_on, mix=self.mix_grid.index(point.base_mix))
      base = self.base_scores(tested_on, 1.0)
      share = self.fold_counts[tested_on] / self.count
      for name in ("accuracy", "squared_loss", "log_loss"):
        out[name] += share * getattr(held, name)
        out[f"base_{name}"] += share * base[name]
      chosen.append(point)
    out["chosen"] = [dataclasses.asdict(p) for p in chosen]
    return out


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
  check_criterion(by)
  r = lambda x: round(float(x), 9)
  keys = {
      "squared_loss": lambda p: (r(p.squared_loss), -r(p.accuracy), p.k),
      "accuracy": lambda p: (-r(p.accuracy), r(p.log_loss), p.k),
      "log_loss": lambda p: (r(p.log_loss), -r(p.accuracy), p.k),
  }
  return min(points, key=keys[by])
