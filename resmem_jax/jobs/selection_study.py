"""Comparing selection rules on validation rows only: how the defaults are chosen without a test split.

For every trained run of a sweep (the sweep's own sub-directories ``<label>_<value>/seed_<s>``,
whose checkpoints are reused), one validation sweep over a superset grid scores every grid point
on both validation folds. Each candidate rule (a criterion ``select_by`` and a temperature grid)
is then scored by cross-fitting: chosen on one fold, scored on the other, both ways
(``SelectionSweep.held_out_scores``). No test row is read.

A rule's score per run is ResMem's held-out validation accuracy gain over the base model (the
quantity the tools report on test) and its held-out log loss. Rules are compared by the mean over
runs of their paired differences from the best rule, with a Student t interval over runs.
"""
from __future__ import annotations

import dataclasses
import itertools
import pathlib
from typing import Sequence

import numpy as np

from resmem_jax import fitting
from resmem_jax import jsonio
from resmem_jax import settings as settings_lib
from resmem_jax.core import selection
from resmem_jax.jobs import engine

TEMPERATURE_GRIDS = {"T in 0.5-4": (0.5, 1.0, 2.0, 4.0), "T in 0.5-8": (0.5, 1.0, 2.0, 4.0, 8.0)}


@dataclasses.dataclass(frozen=True)
class Rule:
  select_by: str
  temperature_grid: str  # a key of the study's temperature grids

  @property
  def name(self) -> str:
    return f"{self.select_by}, {self.temperature_grid}"


def study_run(settings: settings_lib.Settings, workdir: pathlib.Path, rules: Sequence[Rule],
              grids: dict, *, progress: bool = False) -> dict:
  """Every rule's held-out validation scores on one trained run (its checkpoint reused)."""
  superset = tuple(sorted({t for grid in grids.values() for t in grid}))
  r = dataclasses.replace(settings.resmem, temperature_grid=superset, temperature=None,
                          gate_alpha=None, tune_recall=None)
  settings = dataclasses.replace(settings, resmem=r)
  _, trained, passes = engine.trained_passes(settings, workdir, progress=progress)
  memory, stores, _ = fitting.build_memory(r, passes, settings.data.name)
  by_temperature = {t: memory.with_store(store) for t, store in stores.items()}
  sweep, _, _ = fitting.validation_sweep(r, passes, memory, by_temperature)
  out = {"workdir": str(workdir), "checkpoint_step": int(trained.step),
         "validation_rows": int(sweep.count), "base_validation": sweep.base_scores(), "rules": {}}
  for rule in rules:
    scores = sweep.held_out_scores(rule.select_by, grids[rule.temperature_grid])
    out["rules"][rule.name] = {
        "accuracy_gain": scores["accuracy"] - scores["base_accuracy"],
        "log_loss_change": scores["log_loss"] - scores["base_log_loss"],
        "accuracy": scores["accuracy"], "log_loss": scores["log_loss"],
        "chosen": scores["chosen"]}
  return out


def _paired(values: np.ndarray) -> dict:
  from scipy import stats  # pylint: disable=g-import-not-at-top
  mean = float(values.mean())
  if values.size < 2:
    return {"mean": mean, "ci95": [mean, mean]}
  half = float(stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size))
  return {"mean": mean, "ci95": [mean - half, mean + half]}


def summarize(runs: list[dict], rules: Sequence[Rule]) -> list[dict]:
  """Per rule: mean held-out accuracy gain and log-loss change over runs, and the paired
  difference in accuracy gain from the rule with the highest mean (interval over runs)."""
  gains = {rule.name: np.asarray([run["rules"][rule.name]["accuracy_gain"] for run in runs])
           for rule in rules}
  losses = {rule.name: np.asarray([run["rules"][rule.name]["log_loss_change"] for run in runs])
            for rule in rules}
  leader = max(gains, key=lambda name: gains[name].mean())
  return [{"rule": rule.name, "select_by": rule.select_by,
           "temperature_grid": rule.temperature_grid,
           "accuracy_gain": _paired(gains[rule.name]),
           "log_loss_change": _paired(losses[rule.name]),
           "accuracy_gain_minus_leader": _paired(gains[rule.name] - gains[leader]),
           "runs": len(runs)} for rule in rules]


def run_study(settings: settings_lib.Settings, sweep_dir: str, field: str, values: Sequence,
              seeds: int, *, grids: dict | None = None, criteria: Sequence[str] = selection.CRITERIA,
              progress: bool = False) -> dict:
  """The study over a sweep's trained runs (``field = value`` for each value, seeds
  ``settings.seed + i``); writes ``<sweep_dir>/selection_study.json``."""
  grids = dict(grids or TEMPERATURE_GRIDS)
  rules = [Rule(by, grid) for by, grid in itertools.product(criteria, grids)]
  label = field.split(".")[-1]
  runs = []
  for value in values:
    for i in range(seeds):
      s = settings_lib.replace_field(settings_lib.replace_field(settings, field, value), "seed",
                                     settings.seed + i)
      workdir = pathlib.Path(sweep_dir) / f"{label}_{value}" / f"seed_{s.seed}"
      if not (workdir / "run.json").exists():
        raise FileNotFoundError(f"{workdir} holds no trained run: run the sweep first (the study "
                                "reuses its checkpoints)")
      run = study_run(s, workdir, rules, grids, progress=progress)
      run.update({field: value, "seed": s.seed})
      runs.append(run)
  out = {"sweep_dir": str(sweep_dir), "field": field, "values": list(values), "seeds": seeds,
         "temperature_grids": {k: list(v) for k, v in grids.items()},
         "method": ("cross-fitted on the validation split's two folds: each rule chooses on one "
                    "fold and is scored on the other, both ways; no test row is read"),
         "summary": summarize(runs, rules), "runs": runs}
  jsonio.write_json_atomic(pathlib.Path(sweep_dir) / "selection_study.json", out)
  return out


def format_study(out: dict) -> str:
  lines = [f"{'rule':<34s}{'held-out val. acc. gain':>26s}{'minus the best':>26s}"
           f"{'log-loss change':>24s}   ({out['summary'][0]['runs']} runs)"]
  for row in out["summary"]:
    g, d, l = row["accuracy_gain"], row["accuracy_gain_minus_leader"], row["log_loss_change"]
    lines.append(f"{row['rule']:<34s}"
                 f"{100 * g['mean']:>+9.3f} [{100 * g['ci95'][0]:+.3f}, {100 * g['ci95'][1]:+.3f}]"
                 f"{100 * d['mean']:>+9.3f} [{100 * d['ci95'][0]:+.3f}, {100 * d['ci95'][1]:+.3f}]"
                 f"{l['mean']:>+9.4f} [{l['ci95'][0]:+.4f}, {l['ci95'][1]:+.4f}]")
  return "\n".join(lines)
