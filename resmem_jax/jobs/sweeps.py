"""The paper's two sweeps: ResMem vs base against model size and against training-set size.

Each (value, seed) is a full engine run in its own sub-directory ``<label>_<value>/seed_<s>`` (so
every run resumes and reuses its memory independently); the sweep keeps every seed's results in
one JSON, summarises each value over seeds (mean, standard deviation, min, max) and draws one PNG:
accuracy and the gain against the swept quantity, mean with error bars (one standard deviation
over seeds) and a point per seed, each seed's gain with its paired-bootstrap 95% interval.

The gains are always ResMem's (it always memorizes); where the opt-in gate ran, its decisions are
counted in a column of their own. ``trend`` is the least-squares slope of every run's gain against
log10 of the swept quantity, with its 95% interval and the two-sided p-value of "no trend": the
direction over the whole measured range, not over a chosen part of it.
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from resmem_jax import jsonio
from resmem_jax import settings as settings_lib
from resmem_jax.jobs import engine


def _seed_row(seed: int, results: dict) -> dict:
  return {
      "seed": seed, "num_params": results["num_params"], "hparams": results["hparams"],
      "base": results["base"], "resmem": results["resmem"],
      "gain_test_accuracy": results["comparison"]["test_accuracy_gain"],
      "comparison": results["comparison"], "gate": results.get("gate", {"enabled": False}),
      "timing": results["timing"],
  }


def _spread(values) -> dict:
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
          "min": float(values.min()), "max": float(values.max())}


def _summary(field: str, value, seed_rows: list) -> dict:
  """One swept value over its seeds."""
  pick = lambda fn: [fn(r) for r in seed_rows]
  row = {field: value, "num_params": seed_rows[0]["num_params"], "seeds": seed_rows,
         "base_test_accuracy": _spread(pick(lambda r: r["base"]["test_accuracy"])),
         "resmem_test_accuracy": _spread(pick(lambda r: r["resmem"]["test_accuracy"])),
         "gain_test_accuracy": _spread(pick(lambda r: r["gain_test_accuracy"])),
         "significant_seeds": sum(r["comparison"]["p_value"] < 0.05 for r in seed_rows)}
  if all(r["gate"].get("enabled") for r in seed_rows):
    row["gate_memorized_seeds"] = sum(bool(r["gate"]["memorize"]) for r in seed_rows)
  if all("train_accuracy" in r["resmem"] for r in seed_rows):
    row["base_train_accuracy"] = _spread(pick(lambda r: r["base"]["train_accuracy"]))
    row["resmem_train_accuracy"] = _spread(pick(lambda r: r["resmem"]["train_accuracy"]))
  return row


def run_sweep(settings, workdir, field: str, values: Sequence, label: str, *, seeds: int = 1,
              progress: bool = True) -> list[dict]:
  """Engine runs for every ``field = value`` and seed ``settings.seed + i``, ``i < seeds``."""
  if seeds < 1:
    raise ValueError(f"seeds must be >= 1, got {seeds}")
  workdir = pathlib.Path(workdir)
  # Every variant is built (and so checked) before the first one runs.
  variants = [[settings_lib.replace_field(settings_lib.replace_field(settings, field, value),
                                          "seed", settings.seed + i) for i in range(seeds)]
              for value in values]
  rows = []
  for value, per_seed in zip(values, variants, strict=True):
    seed_rows = [_seed_row(s.seed, engine.run(s, workdir / f"{label}_{value}" / f"seed_{s.seed}",
                                              progress=progress))
                 for s in per_seed]
    rows.append(_summary(field, value, seed_rows))
  return rows


def gain_trend(rows: list, x_key: str) -> dict | None:
  """Slope of every run's test-accuracy gain (points) against log10 of ``x_key``, by least
  squares over all runs, with its 95% interval and two-sided p-value; None with fewer than three
  runs at two or more values."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  xs = np.asarray([np.log10(float(r[x_key])) for r in rows for _ in r["seeds"]])
  gains = np.asarray([100 * s["gain_test_accuracy"] for r in rows for s in r["seeds"]])
  if gains.size < 3 or np.unique(xs).size < 2:
    return None
  fit = stats.linregress(xs, gains)
  half = float(stats.t.ppf(0.975, gains.size - 2)) * fit.stderr
  return {"x": x_key, "slope_points_per_decade": float(fit.slope),
          "ci95": [float(fit.slope - half), float(fit.slope + half)],
          "p_value": float(fit.pvalue), "runs": int(gains.size),
          "method": "least squares over every run's gain, Student t interval (n - 2 df)"}


def model_size_sweep(settings, workdir, field: str, values: Sequence, *, seeds: int = 1,
                     progress: bool = True) -> dict:
  """Runs the engine for each ``<field> = value`` (e.g. ``model.width``) and seed."""
  if not values:
    raise ValueError("a model-size sweep needs at least one value")
  rows = run_sweep(settings, workdir, field, values, field.split(".")[-1], seeds=seeds,
                   progress=progress)
  out = {"dataset": settings.data.name, "model": settings.model.name, "sweep": field,
         "seeds": seeds, "variants": rows, "trend": gain_trend(rows, "num_params")}
  path = pathlib.Path(workdir)
  jsonio.write_json_atomic(path / "model_size_sweep.json", out)
  plot_sweep(rows, "num_params", "parameters", path / "model_size_sweep.png",
             f"{settings.data.name} / {settings.model.name}: accuracy vs model size ({field})")
  return out


def sample_size_sweep(settings, workdir, fractions: Sequence[float], *, seeds: int = 1,
                      progress: bool = True) -> dict:
  """Runs the engine for each ``data.train_fraction`` in ``fractions`` and seed."""
  if not fractions or any(not 0 < f <= 1 for f in fractions):
    raise ValueError(f"fractions must be in (0, 1], got {list(fractions)}")
  rows = run_sweep(settings, workdir, "data.train_fraction", [float(f) for f in fractions],
                   "fraction", seeds=seeds, progress=progress)
  out = {"dataset": settings.data.name, "model": settings.model.name,
         "sweep": "data.train_fraction", "seeds": seeds, "variants": rows,
         "trend": gain_trend(rows, "data.train_fraction")}
  path = pathlib.Path(workdir)
  jsonio.write_json_atomic(path / "sample_size_sweep.json", out)
  plot_sweep(rows, "data.train_fraction", "fraction of the training set",
             path / "sample_size_sweep.png",
             f"{settings.data.name} / {settings.model.name}: accuracy vs training-set size",
             show_train=True)
  return out


def plot_sweep(rows, x_key: str, x_label: str, path: pathlib.Path, title: str, *,
               show_train: bool = False) -> None:
  """Accuracy (left) and ResMem's gain (right) against ``x_key``, over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  xs = np.asarray([r[x_key] for r in rows], np.float64)
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  curves = [("base", "test", "o-", "tab:blue"), ("resmem", "test", "s-", "tab:red")]
  if show_train and all("resmem_train_accuracy" in r for r in rows):
    curves += [("base", "train", "o--", "tab:cyan"), ("resmem", "train", "s--", "tab:orange")]
  for head, split, style, color in curves:
    key = f"{head}_{split}_accuracy"
    means = [100 * r[key]["mean"] for r in rows]
    stds = [100 * r[key]["std"] for r in rows]
    name = "ResMem" if head == "resmem" else "base"
    left.errorbar(xs, means, yerr=stds, fmt=style, color=color, capsize=3,
                  label=f"{name} ({split}), mean +- std")
    for x, r in zip(xs, rows, strict=True):
      seed_values = [100 * s[head][f"{split}_accuracy"] for s in r["seeds"]]
      left.scatter([x] * len(seed_values), seed_values, color=color, s=9, alpha=0.5)
  gains = [100 * r["gain_test_accuracy"]["mean"] for r in rows]
  right.errorbar(xs, gains, yerr=[100 * r["gain_test_accuracy"]["std"] for r in rows],
                 fmt="D-", color="tab:red", capsize=3, label="mean gain +- std over seeds")
  for x, r in zip(xs, rows, strict=True):
    for i, s in enumerate(r["seeds"]):
      low, high = (100 * v for v in s["comparison"]["ci95"])
      offset = x * (1 + 0.04 * (i - (len(r["seeds"]) - 1) / 2))  # side by side on a log axis
      right.errorbar([offset], [100 * s["gain_test_accuracy"]],
                     yerr=[[100 * s["gain_test_accuracy"] - low], [high - 100 * s["gain_test_accuracy"]]],
                     fmt=".", color="gray", alpha=0.7, capsize=2)
  right.plot([], [], ".", color="gray", label="one seed, paired-bootstrap 95% CI")
  right.axhline(0.0, color="black", linewidth=0.8)
  trend = gain_trend(rows, x_key)
  if trend:
    low, high = trend["ci95"]
    right.set_title(f"trend over the whole range: {trend['slope_points_per_decade']:+.2f} points "
                    f"per tenfold {x_label}\n(95% CI {low:+.2f} to {high:+.2f}, least squares "
                    f"over {trend['runs']} runs)", fontsize=9)
  right.set_ylabel("ResMem - base test accuracy (points)")
  left.set_ylabel("accuracy (%)")
  for ax in (left, right):
    ax.set_xscale("log")
    # Ticks at the swept values, written plainly (not 3x10^-1).
    ax.xaxis.set_major_locator(ticker.FixedLocator(xs.tolist()))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter(
        [f"{x:,.0f}" if x >= 1 else f"{x:g}" for x in xs]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel(x_label)
    ax.grid(True, alpha=.3)
    ax.legend(fontsize=8)
  seeds = len(rows[0]["seeds"])
  fig.suptitle(f"{title}; {seeds} seed{'s' if seeds > 1 else ''}", fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
