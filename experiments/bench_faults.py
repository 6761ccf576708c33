r"""The fault catalogue: runs every bad input, corruption and kill of experiments/faults.py and
prints a markdown table of what a user sees, then a summary (UNCLEAR and SILENT should be 0).

  python -m experiments.bench_faults [--kills=16] [--output=/tmp/faults.md]
"""
from resmem_jax.cli import flags as cli_flags  # first: quiets TensorFlow before it loads

from absl import flags

from experiments import faults

_KILLS = flags.DEFINE_integer("kills", 16, "SIGKILLs of the main job at random instants.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the markdown table to this file.")


def main(argv):
  del argv
  outcomes = faults.run_catalogue(kills=_KILLS.value)
  table = faults.markdown(outcomes)
  print(table)
  print(faults.summary(outcomes))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  cli_flags.run(main)
