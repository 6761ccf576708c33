"""The paper's two sweeps: ResMem vs base against model size and against training-set size.

Each variant is a full engine run in its own sub-directory (so every variant resumes and reuses its
memory independently); the sweep collects the variants' results into one JSON and draws one PNG.
"""
from __future__ import annotations

import pathlib
from typing import Sequence

from resmem_jax import jsonio
from resmem_jax import settings as settings_lib
from resmem_jax.jobs import engine


def _summary(field: str, value, results: dict) -> dict:
  return {
      field: value,
      "num_params": results["num_params"],
      "hparams": results["hparams"],
      "base": results["base"],
      "resmem": results["resmem"],
      "gain_test_accuracy": results["resmem"]["test_accuracy"] - results["base"]["test_accuracy"],
      "timing": results["timing"],
  }


def _run_variants(settings, workdir, field: str, values: Sequence, label: str, progress: bool):
  workdir = pathlib.Path(workdir)
  variants = [settings_lib.replace_field(settings, field, value) for value in values]
  rows = []
  for value, variant in zip(values, variants):  # every variant checked before the first runs
    results = engine.run(variant, workdir / f"{label}_{value}", progress=progress)
    rows.append(_summary(field, value, results))
  return rows


def model_size_sweep(settings, workdir, field: str, values: Sequence, *,
                     progress: bool = True) -> dict:
  """Runs the engine for each ``<field> = value`` (e.g. ``model.width``)."""
  if not values:
    raise ValueError("a model-size sweep needs at least one value")
  rows = _run_variants(settings, workdir, field, values, field.split(".")[-1], progress)
  out = {"dataset": settings.data.name, "model": settings.model.name, "sweep": field,
         "variants": rows}
  jsonio.write_json_atomic(pathlib.Path(workdir) / "model_size_sweep.json", out)
  plot_sweep(rows, "num_params", "parameters", pathlib.Path(workdir) / "model_size_sweep.png",
             f"{settings.data.name}: accuracy vs model size ({field})")
  return out


def sample_size_sweep(settings, workdir, fractions: Sequence[float], *,
                      progress: bool = True) -> dict:
  """Runs the engine for each ``data.train_fraction`` in ``fractions``."""
  if not fractions or any(not 0 < f <= 1 for f in fractions):
    raise ValueError(f"fractions must be in (0, 1], got {list(fractions)}")
  rows = _run_variants(settings, workdir, "data.train_fraction", [float(f) for f in fractions],
                       "fraction", progress)
  out = {"dataset": settings.data.name, "model": settings.model.name,
         "sweep": "data.train_fraction", "variants": rows}
  jsonio.write_json_atomic(pathlib.Path(workdir) / "sample_size_sweep.json", out)
  plot_sweep(rows, "data.train_fraction", "fraction of the training set",
             pathlib.Path(workdir) / "sample_size_sweep.png",
             f"{settings.data.name}: accuracy vs training-set size", show_train=True)
  return out


def plot_sweep(rows, x_key: str, x_label: str, path: pathlib.Path, title: str, *,
               show_train: bool = False) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  xs = [r[x_key] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(xs, [100 * r["base"]["test_accuracy"] for r in rows], "o-", label="base (test)")
  ax.plot(xs, [100 * r["resmem"]["test_accuracy"] for r in rows], "s-", label="ResMem (test)")
  if show_train and all("train_accuracy" in r["base"] for r in rows):
    ax.plot(xs, [100 * r["base"]["train_accuracy"] for r in rows], "o--", alpha=.6,
            label="base (train)")
    ax.plot(xs, [100 * r["resmem"]["train_accuracy"] for r in rows], "s--", alpha=.6,
            label="ResMem (train)")
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
