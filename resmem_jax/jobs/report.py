"""The printed tables of a run's ``results.json`` (the binaries print; the library only formats)."""
from __future__ import annotations


def _heads(results: dict) -> list[str]:
  return [h for h in ("base", "resmem", "knnlm") if h in results]


def format_table(results: dict) -> str:
  """Base vs ResMem (vs kNN-LM) side by side on test (and validation / train), with the choice."""
  heads = _heads(results)
  hp = results["hparams"]
  row_kind = results.get("row", "example")
  lines = [f"{results['dataset']} / {results['model']} ({results['num_params']:,} params), "
           f"{results['num_rows']['test']:,} test {row_kind}s, memory of "
           f"{results['memory']['size']:,} {row_kind}s ({results['memory']['backend']}, "
           f"{results['memory']['residual_format']})",
           f"{'':22s}" + "".join(f"{h:>12s}" for h in heads)]
  rows = [("test accuracy", "test_accuracy", 100, "%"), ("test error (0-1)", "test_error", 100, "%"),
          ("test squared loss", "test_squared_loss", 1, " "), ("test log loss", "test_log_loss", 1, " ")]
  if row_kind == "token":
    rows.append(("test perplexity", "test_perplexity", 1, " "))
  rows.append(("validation accuracy", "validation_accuracy", 100, "%"))
  if all("train_accuracy" in results[h] for h in heads):
    rows.append(("train accuracy", "train_accuracy", 100, "%"))
  for label, key, scale, unit in rows:
    cells = []
    for head in heads:
      value = results[head].get(key)
      cells.append(f"{'-':>11s} " if value is None else f"{value * scale:11.3f}{unit}")
    lines.append(f"{label:22s}" + "".join(cells))
  lines.append(f"ResMem: k={hp['k']} sigma={hp['sigma']:.4g} T={hp['temperature']:g} "
               f"({hp['chosen_on']}, by validation {hp['select_by']})")
  if "knnlm" in hp:
    knn = hp["knnlm"]
    lines.append(f"kNN-LM: k={knn['k']} sigma={knn['sigma']:.4g} T={knn['temperature']:g} "
                 f"lambda={knn['lambda']:g}")
  t = results["timing"]
  lines.append(f"prediction time on test: base forward {t['base_forward_seconds']:.3f}s, "
               f"resmem {t['resmem_total_seconds']:.3f}s ({t['resmem_over_base']:.2f}x; fastest "
               f"of {t['timing_repeats']})")
  return "\n".join(lines)


def format_sweep(out: dict, field: str) -> str:
  """One line per sweep variant: size, parameters, base and ResMem test accuracy, gain."""
  lines = [f"{field:>20s}{'params':>12s}{'base':>9s}{'resmem':>9s}{'gain':>8s}{'resmem train':>14s}"]
  for row in out["variants"]:
    train = row["resmem"].get("train_accuracy")
    lines.append(f"{row[field]!s:>20s}{row['num_params']:>12,}"
                 f"{100 * row['base']['test_accuracy']:>8.2f}%"
                 f"{100 * row['resmem']['test_accuracy']:>8.2f}%"
                 f"{100 * row['gain_test_accuracy']:>+7.2f}"
                 + (f"{100 * train:>13.2f}%" if train is not None else f"{'-':>14s}"))
  return "\n".join(lines)
