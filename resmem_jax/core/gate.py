"""The opt-in memorization gate: does memorizing beat the base model on rows it was not chosen on?

ResMem always memorizes (the paper's rule) and is reported as such. The gate is a separate
decision, reported beside ResMem, for users who want to deploy the memory only when validation
says it helps (``resmem.gate_alpha``). Its rule, on the two folds of the validation sweep
(``selection.fold_of``):

1. On fold 0 (the selection half) choose ResMem's (k, sigma, T, mix) by the selection criterion,
   and the comparator: the base model's own temperature from the same grid, by the same criterion
   (temperature scaling, which needs no memory). A gain that temperature scaling alone gives is
   then no reason to memorize.
2. On fold 1 (the test half) score every row under both choices; a row's improvement ``D`` is
   ResMem's score minus the comparator's (more hits, less loss count as positive).
3. Test "mean D <= 0" one-sided: with accuracy and independent rows, exactly (a binomial test on
   the rows where exactly one of the two is right: McNemar, one-sided); otherwise a one-sided
   Student t-test on the per-unit sums of D, a unit being ``fold_block`` consecutive rows (a
   sequence's tokens are not independent of each other).
Memorize when p <= alpha. The test half played no part in the choice, so the p-value holds at its
nominal level whatever the grid; using both halves both ways (cross-fitting) lets the choices
correlate the two halves' sums, and was measured above its level (BUILD_NOTES.md).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from resmem_jax.core import metrics
from resmem_jax.core import predictor
from resmem_jax.core import selection

# The rule in words; part of a saved choice's key, so a choice made under another rule is made
# again.
GATE_RULE = ("sample split: choose ResMem and the best temperature-scaled base on fold 0 of "
             "validation, one-sided test of ResMem's gain over that base on fold 1 (exact McNemar "
             "for accuracy on independent rows, else a t-test over units of fold_block rows)")
_COLUMN = {"accuracy": "hit", "squared_loss": "squared_loss", "log_loss": "log_loss"}


@dataclasses.dataclass(frozen=True)
class HalfChoice:
  """What the selection half (fold 0) chose."""
  point: selection.GridPoint           # ResMem's k, sigma, T and mix
  comparator_temperature: float        # the base model's best temperature


def choose_on_selection_half(sweep: selection.SelectionSweep, by: str) -> HalfChoice:
  """ResMem's point and the comparator's temperature, both chosen by ``by`` on fold 0."""
  selection.check_criterion(by)
  point = selection.best(sweep.points(0)[0], by)
  comparator = selection.best(sweep.base_points(0), by)
  return HalfChoice(point, comparator.temperature)


@jax.jit
def _score_rows(logits, labels, distances, values, columns, sigma, temperature, mix,
                comparator_temperature):
  base_t = predictor.base_prediction(logits, temperature)
  base_1 = predictor.base_prediction(logits, 1.0)
  weights = predictor.neighbour_weights(distances, sigma)
  pred = predictor.resmem_prediction(base_t, weights, values, columns)
  resmem = metrics.per_row(pred, labels)
  resmem["log_loss"] = metrics.per_row(
      predictor.resmem_probabilities(pred, base_1, mix), labels)["log_loss"]
  comparator = metrics.per_row(predictor.base_prediction(logits, comparator_temperature), labels)
  return resmem, comparator


def score_rows(choice: HalfChoice, logits, labels, distances, values, columns=None):
  """Per-row ``hit``, ``squared_loss`` and ``log_loss`` of ResMem at ``choice.point`` (its class
  and squared loss from p + r, its log loss from its probability output) and of the comparator,
  from the rows' neighbours (``distances [q, k]`` ascending and their residual rows at the
  point's temperature). Returns two dicts of float arrays ``[q]``."""
  p = choice.point
  k = int(p.k)
  resmem, comparator = _score_rows(
      np.asarray(logits, np.float32), np.asarray(labels, np.int32),
      np.asarray(distances, np.float32)[:, :k], np.asarray(values)[:, :k],
      None if columns is None else np.asarray(columns)[:, :k], np.float32(p.sigma),
      np.float32(p.temperature), np.float32(p.base_mix), np.float32(choice.comparator_temperature))
  return ({n: np.asarray(v, np.float64) for n, v in resmem.items()},
          {n: np.asarray(v, np.float64) for n, v in comparator.items()})


def held_out_test(resmem_rows: dict, comparator_rows: dict, units: np.ndarray, by: str) -> dict:
  """The one-sided test of ResMem's improvement over the comparator on the test half.

  ``resmem_rows`` / ``comparator_rows``: per-row scores (:func:`score_rows`) of the test half's
  rows; ``units``: each row's unit (rows of one unit are dependent, units are independent).
  Returns ``p_value``, ``gain`` (mean improvement per row: accuracy points as a fraction, or loss
  reduction), its 95% interval ``ci95``, ``rows``, ``units`` and the ``test`` used.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  selection.check_criterion(by)
  column = _COLUMN[by]
  sign = 1.0 if by == "accuracy" else -1.0  # positive: more hits, less loss
  diff = sign * (np.asarray(resmem_rows[column], np.float64)
                 - np.asarray(comparator_rows[column], np.float64))
  units = np.asarray(units)
  if diff.shape != units.shape or diff.ndim != 1:
    raise ValueError(f"need one unit per row, got {diff.shape} rows and {units.shape} units")
  rows = int(diff.size)
  if rows == 0:
    raise ValueError("the gate's test half has no rows: it needs at least two validation rows")
  _, unit_index = np.unique(units, return_inverse=True)
  sums = np.bincount(unit_index, weights=diff)
  count = int(sums.size)
  gain = float(diff.sum() / rows)
  # Interval of the per-row mean from the spread of unit sums (rows within a unit may correlate).
  spread = float(np.std(sums, ddof=1)) if count > 1 else 0.0
  half = float(stats.t.ppf(0.975, count - 1)) * spread * np.sqrt(count) / rows if count > 1 else 0.0
  out = {"gain": gain, "ci95": [gain - half, gain + half], "rows": rows, "units": count}
  if by == "accuracy" and count == rows:
    gained = int(np.sum(diff > 0))
    lost = int(np.sum(diff < 0))
    p = (float(stats.binomtest(gained, gained + lost, 0.5, alternative="greater").pvalue)
         if gained + lost else 1.0)
    out.update(p_value=p, gained=gained, lost=lost,
               test="exact one-sided McNemar (binomial on the rows where exactly one is right)")
    return out
  if count < 2:
    p = 1.0
  elif spread == 0.0:
    p = 0.0 if gain > 0 else 1.0
  else:
    p = float(stats.ttest_1samp(sums, 0.0, alternative="greater").pvalue)
  out.update(p_value=p, test=f"one-sided Student t-test over {count} units")
  return out


def decision(alpha: float, by: str, half: HalfChoice, test: dict) -> dict:
  """The gate's block of ``results.json``."""
  return {"enabled": True, "alpha": float(alpha), "select_by": by, "rule": GATE_RULE,
          "memorize": bool(test["p_value"] <= alpha), "p_value": test["p_value"],
          "held_out": test,
          "chosen_on_selection_half": {"k": int(half.point.k), "sigma": float(half.point.sigma),
                                       "temperature": float(half.point.temperature),
                                       "base_mix": half.point.base_mix},
          "comparator": {"model": "base", "temperature": float(half.comparator_temperature)}}
