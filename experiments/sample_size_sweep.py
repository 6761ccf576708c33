r"""ResMem vs base test (and train) accuracy against the fraction of the training set -> JSON + PNG.

  python -m experiments.sample_size_sweep --config=experiments/configs/mnist.py \
      --config.data.manual_dir=../shared/datasets/mnist --fractions=0.1,0.25,0.5,1 \
      --workdir=/tmp/mnist_sample_sweep
"""
from absl import app, flags
from ml_collections import config_flags

from experiments import common_flags  # noqa: F401

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "sweep directory (one sub-directory per fraction)")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.1", "0.25", "0.5", "1.0"], "training-set fractions")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from resmem_jax import sweeps
  out = sweeps.sample_size_sweep(_CONFIG.value, _WORKDIR.value, [float(f) for f in _FRACTIONS.value])
  print(f"{'fraction':>9s}{'base':>9s}{'resmem':>9s}{'gain':>8s}{'resmem train':>14s}")
  for row in out["variants"]:
    print(f"{row['train_fraction']:>9g}{100 * row['base']['test_accuracy']:>8.2f}%"
          f"{100 * row['resmem']['test_accuracy']:>8.2f}%{100 * row['gain_test_accuracy']:>+7.2f}"
          f"{100 * row['resmem']['train_accuracy']:>13.2f}%")


if __name__ == "__main__":
  app.run(main)
