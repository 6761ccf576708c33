"""Language modelling with ResMem and kNN-LM on one per-token memory.

  python -m experiments.resmem_lm --config=experiments/configs/tiny_shakespeare.py --workdir=/tmp/ts
  python -m experiments.resmem_lm --config=experiments/configs/tiny_shakespeare.py:tiny \
      --workdir=/tmp/ts_tiny --config.data.data_dir=/tmp/tfds

Trains the decoder-only Transformer with the project's training stack (resuming from
WORKDIR/checkpoints), builds the memory over every training token, chooses k, sigma, T and
kNN-LM's lambda on the validation split and writes WORKDIR/results.json plus a printed table.
"""
from experiments import common_flags  # noqa: F401  (must come first: quiets TensorFlow)

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from resmem_jax import lm

_CONFIG = config_flags.DEFINE_config_file("config", None, "LM config file (.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  results = lm.run(_CONFIG.value, _WORKDIR.value)
  print(lm.format_table(results))


if __name__ == "__main__":
  app.run(main)
