r"""ResMem vs base test (and train) accuracy against the fraction of the training set -> JSON + PNG.

  python -m experiments.sample_size_sweep --config=experiments/configs/mnist.py:mlp \
      --config.data.manual_dir=/path/to/mnist_archives --fractions=0.1,0.25,0.5,1 \
      --workdir=/tmp/mnist_sample_sweep
"""
from experiments import common_flags  # noqa: F401  (must come first: quiets TensorFlow)

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one sub-directory per fraction).")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.1", "0.25", "0.5", "1.0"], "Training-set fractions.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per value: config.seed, config.seed + 1, ...")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from resmem_jax import settings  # pylint: disable=g-import-not-at-top
  from resmem_jax.jobs import report, sweeps  # pylint: disable=g-import-not-at-top
  with common_flags.user_errors():
    out = sweeps.sample_size_sweep(settings.from_config(_CONFIG.value), _WORKDIR.value,
                                   [float(f) for f in _FRACTIONS.value], seeds=_SEEDS.value)
  print(report.format_sweep(out, "data.train_fraction"))


if __name__ == "__main__":
  common_flags.run(main)
