r"""The memorization gate's false-positive rate on null problems (where memorizing adds nothing).

    python -m experiments.bench_gate --problems=1000 --output=/tmp/gate_null.json

Prints, per null family and selection criterion, how many problems the gate passes at
--alpha with the rate's 95% Clopper-Pearson interval, for the gate's comparator (the best
temperature-scaled base) and, with --comparators=best_temperature,base_1, for the base at T = 1.
"""
from resmem_jax.cli import flags as cli_flags  # first: quiets TensorFlow before it loads

import json

from absl import flags

from resmem_jax.bench import gate_null

_PROBLEMS = flags.DEFINE_integer("problems", 1000, "Null problems per family (seeds seed..seed+N-1).")
_ALPHA = flags.DEFINE_float("alpha", 0.05, "The gate's level.")
_SEED = flags.DEFINE_integer("seed", 0, "First problem seed.")
_COMPARATORS = flags.DEFINE_list("comparators", ["best_temperature"],
                                 f"Comparators to measure, of {list(gate_null.COMPARATORS)}.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write every p-value to this JSON file.")


def main(argv):
  del argv
  rows = []
  print(f"{'comparator':<18}{'family':<15}{'select_by':<14}{'passed':>12}{'rate':>8}   95% CI")
  for comparator in _COMPARATORS.value:
    for row in gate_null.null_rates(problems=_PROBLEMS.value, comparator=comparator,
                                    alpha=_ALPHA.value, seed=_SEED.value):
      low, high = row["ci95"]
      print(f"{comparator:<18}{row['family']:<15}{row['select_by']:<14}"
            f"{row['passed']:>6}/{row['problems']:<5}{row['rate']:>8.3f}   [{low:.3f}, {high:.3f}]",
            flush=True)
      rows.append(row)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(rows, f)


if __name__ == "__main__":
  cli_flags.run(main)
