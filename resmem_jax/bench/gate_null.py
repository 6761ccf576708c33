"""How often the memorization gate passes on problems where memorizing adds nothing (its size).

Each null problem is a validation sweep over a memory whose residual rows carry no information
about the validation labels, run through the gate's own code (``core/selection.py``,
``core/gate.py``). Two families:

* ``noise``: the base model's logits are unrelated to the labels and the neighbours are random
  memory rows (the null of ``tests/test_core.py``).
* ``overconfident``: labels are drawn from softmax(z), the base model reports 3 z (over-confident),
  and the neighbours are random memory rows. Temperature scaling helps here, memorizing does not:
  a gate that compares against the base model at T = 1 passes it almost always.
* ``faint``: ``noise`` with every residual row scaled by 0.02, so ResMem moves the base model's
  prediction by almost nothing: its true loss is barely above the base's, the hardest null for
  the loss criteria (near the boundary of "no gain").

A gate of level alpha should pass at most a fraction alpha of these problems. ``comparator``
"base_1" scores the same sample-split test against the base model at T = 1 instead of the best
temperature-scaled base (the rule before), to show what the comparator is for.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from resmem_jax.core import gate
from resmem_jax.core import residuals
from resmem_jax.core import selection

FAMILIES = ("noise", "overconfident", "faint")
COMPARATORS = ("best_temperature", "base_1")


@dataclasses.dataclass(frozen=True)
class NullGrid:
  """The problem's size and the selection grid (small enough for thousands of problems)."""
  memory_rows: int = 400
  validation_rows: int = 2000
  classes: int = 4
  k_grid: tuple = (1, 2, 4, 8, 16)
  sigma_grid: tuple = (0.01, 0.1, 1.0, 10.0)
  temperature_grid: tuple = (0.5, 1.0, 2.0, 4.0)
  mix_grid: tuple = (0.0, 0.5, 1.0)


def _softmax_rows(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def null_problem(rng: np.random.Generator, family: str, grid: NullGrid = NullGrid()):
  """``(stores {T: residual rows}, distances, ids, validation logits, validation labels)``."""
  n, q, c, k = grid.memory_rows, grid.validation_rows, grid.classes, max(grid.k_grid)
  if family in ("noise", "faint"):
    train_logits = rng.normal(size=(n, c)).astype(np.float32)
    train_labels = rng.integers(0, c, n)
    val_logits = rng.normal(size=(q, c)).astype(np.float32)
    val_labels = rng.integers(0, c, q)
  elif family == "overconfident":
    def draw(rows):
      z = rng.normal(size=(rows, c))
      labels = np.array([rng.choice(c, p=p) for p in _softmax_rows(z)])
      return (3.0 * z).astype(np.float32), labels
    train_logits, train_labels = draw(n)
    val_logits, val_labels = draw(q)
  else:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  scale = 0.02 if family == "faint" else 1.0
  stores = {t: scale * np.asarray(residuals.residuals(train_labels, train_logits, t))
            for t in grid.temperature_grid}
  ids = np.stack([rng.choice(n, k, replace=False) for _ in range(q)])  # unrelated to the query
  distances = np.sort(rng.random((q, k)), axis=1).astype(np.float32)
  return stores, distances, ids, val_logits, val_labels


def gate_test(problem, by: str, grid: NullGrid = NullGrid(),
              comparator: str = "best_temperature") -> dict:
  """The gate's held-out test on one problem (:func:`gate.held_out_test`'s dict)."""
  stores, distances, ids, logits, labels = problem
  sweep = selection.SelectionSweep(k_grid=grid.k_grid, sigma_grid=grid.sigma_grid,
                                   temperature_grid=grid.temperature_grid,
                                   num_classes=grid.classes, mix_grid=grid.mix_grid)
  sweep.add(distances, ids, logits, labels, lambda t, nb: (stores[t][nb], None))
  half = gate.choose_on_selection_half(sweep, by)
  if comparator == "base_1":
    half = dataclasses.replace(half, comparator_temperature=1.0)
  elif comparator != "best_temperature":
    raise ValueError(f"comparator must be one of {COMPARATORS}, got {comparator!r}")
  rows = np.flatnonzero(selection.fold_of(np.arange(labels.size), sweep.fold_block) == 1)
  resmem, base = gate.score_rows(half, logits[rows], labels[rows], distances[rows],
                                 stores[half.point.temperature][ids[rows]])
  return gate.held_out_test(resmem, base, rows, by)


def clopper_pearson(passed: int, total: int, level: float = 0.95) -> tuple[float, float]:
  """Exact binomial interval of a rate."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  tail = (1 - level) / 2
  low = 0.0 if passed == 0 else float(stats.beta.ppf(tail, passed, total - passed + 1))
  high = 1.0 if passed == total else float(stats.beta.ppf(1 - tail, passed + 1, total - passed))
  return low, high


def null_rates(*, problems: int, criteria: Sequence[str] = selection.CRITERIA,
               families: Sequence[str] = FAMILIES, comparator: str = "best_temperature",
               alpha: float = 0.05, seed: int = 0, grid: NullGrid = NullGrid()) -> list[dict]:
  """For each family and criterion: how many of ``problems`` seeded null problems the gate
  passes at ``alpha``, with the rate's 95% Clopper-Pearson interval. Problem ``i`` of a family is
  drawn from seed ``seed + i`` (the same problems for every criterion)."""
  if problems < 1:
    raise ValueError(f"problems must be >= 1, got {problems}")
  out = []
  for family in families:
    p_values: dict[str, list[float]] = {by: [] for by in criteria}
    for i in range(problems):
      problem = null_problem(np.random.default_rng([seed + i, FAMILIES.index(family)]), family,
                             grid)
      for by in criteria:
        p_values[by].append(gate_test(problem, by, grid, comparator)["p_value"])
    for by in criteria:
      passed = int(np.sum(np.asarray(p_values[by]) <= alpha))
      out.append({"family": family, "select_by": by, "comparator": comparator, "alpha": alpha,
                  "problems": problems, "passed": passed, "rate": passed / problems,
                  "ci95": list(clopper_pearson(passed, problems)),
                  "p_values": [float(p) for p in p_values[by]]})
  return out
