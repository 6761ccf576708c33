r"""ResMem vs base test accuracy against model size (one pipeline run per size) -> JSON + PNG.

  python -m experiments.model_size_sweep --config=experiments/configs/mnist.py \
      --config.data.manual_dir=../shared/datasets/mnist --field=model.width --values=8,16,64,256 \
      --workdir=/tmp/mnist_size_sweep
"""
from absl import app, flags
from ml_collections import config_flags

from experiments import common_flags  # noqa: F401

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "sweep directory (one sub-directory per size)")
_FIELD = flags.DEFINE_string("field", "model.width", "config field that sets the size, e.g. model.depth")
_VALUES = flags.DEFINE_list("values", ["8", "16", "64", "256"], "values of --field, smallest first")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from resmem_jax import sweeps
  values = [int(v) for v in _VALUES.value]
  out = sweeps.model_size_sweep(_CONFIG.value, _WORKDIR.value, _FIELD.value, values)
  print(f"{'size':>8s}{'params':>12s}{'base':>9s}{'resmem':>9s}{'gain':>8s}")
  for row in out["variants"]:
    print(f"{row[_FIELD.value]:>8}{row['num_params']:>12,}{100 * row['base']['test_accuracy']:>8.2f}%"
          f"{100 * row['resmem']['test_accuracy']:>8.2f}%{100 * row['gain_test_accuracy']:>+7.2f}")


if __name__ == "__main__":
  app.run(main)
