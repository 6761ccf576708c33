"""The paper's two sweeps: ResMem vs base against model size and against training-set size.

Each variant is a full ``pipeline.run`` in its own sub-directory (so every variant resumes and
reuses its memory independently); the sweep collects the variants' ``results.json`` into one JSON
and draws one PNG.
"""
from __future__ import annotations

import copy
import pathlib
from typing import Sequence

from resmem_jax import pipeline
from resmem_jax.jsonio import write_json_atomic


def _summary(name: str, value, results: dict) -> dict:
  return {
      name: value,
      "num_params": results["num_params"],
      "hparams": results["hparams"],
      "base": results["base"],
      "resmem": results["resmem"],
      "gain_test_accuracy": results["resmem"]["test_accuracy"] - results["base"]["test_accuracy"],
      "timing": results["timing"],
  }


def _run_variants(config, workdir, field: str, values: Sequence, label: str):
  workdir = pathlib.Path(workdir)
  rows = []
  for value in values:
    cfg = copy.deepcopy(config)
    section, key = field.split(".")
    with cfg.unlocked():
      cfg[section][key] = type(cfg[section][key])(value) if cfg[section].get(key) is not None else value
    results = pipeline.run(cfg, workdir / f"{label}_{value}")
    rows.append(_summary(field, value, results))
  return rows


def model_size_sweep(config, workdir, field: str, values: Sequence) -> dict:
  """Runs the pipeline for each ``config.<field> = value`` (e.g. ``model.width``)."""
  if not values:
    raise ValueError("model-size sweep needs at least one value")
  rows = _run_variants(config, workdir, field, values, field.split(".")[-1])
  out = {"dataset": str(config.data.name), "model": str(config.model.name), "sweep": field,
         "variants": rows}
  write_json_atomic(pathlib.Path(workdir) / "model_size_sweep.json", out)
  plot_sweep(rows, "num_params", "parameters", pathlib.Path(workdir) / "model_size_sweep.png",
             f"{config.data.name}: accuracy vs model size ({field})", log_x=True)
  return out


def sample_size_sweep(config, workdir, fractions: Sequence[float]) -> dict:
  """Runs the pipeline for each ``data.train_fraction`` in ``fractions``."""
  if not fractions or any(not 0 < f <= 1 for f in fractions):
    raise ValueError(f"fractions must be in (0, 1], got {list(fractions)}")
  rows = _run_variants(config, workdir, "data.train_fraction", [float(f) for f in fractions],
                       "fraction")
  for row in rows:
    row["train_fraction"] = row.pop("data.train_fraction")
  out = {"dataset": str(config.data.name), "model": str(config.model.name),
         "sweep": "data.train_fraction", "variants": rows}
  write_json_atomic(pathlib.Path(workdir) / "sample_size_sweep.json", out)
  plot_sweep(rows, "train_fraction", "fraction of the training set",
             pathlib.Path(workdir) / "sample_size_sweep.png",
             f"{config.data.name}: accuracy vs training-set size", log_x=True, show_train=True)
  return out


def plot_sweep(rows, x_key: str, x_label: str, path: pathlib.Path, title: str, *,
               log_x: bool = False, show_train: bool = False) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  xs = [r[x_key] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(xs, [100 * r["base"]["test_accuracy"] for r in rows], "o-", label="base (test)")
  ax.plot(xs, [100 * r["resmem"]["test_accuracy"] for r in rows], "s-", label="ResMem (test)")
  if show_train:
    ax.plot(xs, [100 * r["base"]["train_accuracy"] for r in rows], "o--", alpha=.6,
            label="base (train)")
    ax.plot(xs, [100 * r["resmem"]["train_accuracy"] for r in rows], "s--", alpha=.6,
            label="ResMem (train)")
  if log_x:
    ax.set_xscale("log")
  ax.set_xlabel(x_label)
  ax.set_ylabel("accuracy (%)")
  ax.set_title(title)
  ax.grid(True, alpha=.3)
  ax.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
