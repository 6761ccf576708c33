"""The printed tables of a run's ``results.json`` (the binaries print; the library only formats)."""
from __future__ import annotations

from resmem_jax import fitting
from resmem_jax.core import metrics


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
  rows = [("test accuracy", "test_accuracy", 100, "%"),
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
  mix = hp.get("base_mix")
  lines.append(f"ResMem: k={hp['k']} sigma={hp['sigma']:.4g} T={hp['temperature']:g}"
               + (f" base_mix={mix:g}" if mix is not None else "")
               + f" ({hp['chosen_on']}, by validation {hp['select_by']})")
  for key, name in (("comparison", "ResMem"), ("comparison_knnlm", "kNN-LM")):
    if key in results:
      lines.append(format_comparison(results[key], name))
  gate = results.get("gate", {})
  if gate.get("enabled"):
    lines.append(f"gate (opt-in, reported beside ResMem): {fitting.gate_sentence(gate)}"
                 + ("" if gate["memorize"] else "; a gated deployment would serve the base model"))
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
  """One line per swept value: parameters, base and ResMem test accuracy and the gain (means over
  seeds), the gain's spread over seeds, how many seeds' gains were significant (and, where the
  opt-in gate ran, how many seeds it let memorize), then the trend of the gain over the range."""
  seeds = out.get("seeds", 1)
  gated = all("gate_memorized_seeds" in row for row in out["variants"])
  lines = [f"{field:>20s}{'params':>12s}{'base':>9s}{'resmem':>9s}{'gain':>8s}{'+- std':>8s}"
           f"{'p<0.05':>8s}{'resmem train':>14s}" + (f"{'gate kept':>11s}" if gated else "")
           + f"   (means over {seeds} seed{'s' * (seeds > 1)})"]
  for row in out["variants"]:
    train = row.get("resmem_train_accuracy")
    lines.append(f"{row[field]!s:>20s}{row['num_params']:>12,}"
                 f"{100 * row['base_test_accuracy']['mean']:>8.2f}%"
                 f"{100 * row['resmem_test_accuracy']['mean']:>8.2f}%"
                 f"{100 * row['gain_test_accuracy']['mean']:>+8.2f}"
                 f"{100 * row['gain_test_accuracy']['std']:>8.2f}"
                 f"{row['significant_seeds']:>5d}/{seeds:<2d}"
                 + (f"{100 * train['mean']:>13.2f}%" if train is not None else f"{'-':>14s}")
                 + (f"{row['gate_memorized_seeds']:>8d}/{seeds:<2d}" if gated else ""))
  trend = out.get("trend")
  if trend:
    low, high = trend["ci95"]
    lines.append(f"trend of the gain over the whole range: {trend['slope_points_per_decade']:+.2f} "
                 f"points per tenfold {trend['x']} (95% CI {low:+.2f} to {high:+.2f}, "
                 f"{metrics.format_p(trend['p_value'])}, {trend['runs']} runs)")
  return "\n".join(lines)


def format_comparison(c: dict, name: str = "ResMem") -> str:
  """``ResMem - base test accuracy: +0.56 points (95% CI ...), McNemar p = 0.0003 (significant
  ...)`` (``p < 1e-300`` where the p-value underflowed to 0), and where it is not significant, about how many test rows would make a gain of that size
  significant."""
  low, high = c["ci95"]
  p = c["p_value"]
  if p < 0.05:
    verdict = "significant at 0.05"
  else:
    verdict = "not significant at 0.05"
    needed = c.get("rows_for_significance")
    if needed is not None and needed > c["rows"]:
      verdict += (f": {c['rows']:,} test rows are too few to call a gain of this size "
                  f"significant; at these rates it would take about {needed:,}")
  return (f"{name} - base test accuracy: {100 * c['test_accuracy_gain']:+.2f} points (95% CI "
          f"{100 * low:+.2f} to {100 * high:+.2f}; {c['gained']} rows gained, {c['lost']} lost), "
          f"McNemar {metrics.format_p(p)} ({verdict})")
