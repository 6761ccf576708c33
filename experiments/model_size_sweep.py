r"""ResMem vs base test accuracy against model size (one engine run per size) -> JSON + PNG.

  python -m experiments.model_size_sweep --config=experiments/configs/mnist.py:mlp \
      --config.data.manual_dir=/path/to/mnist_archives --field=model.width --values=8,16,64,256 \
      --workdir=/tmp/mnist_size_sweep
"""
from experiments import common_flags  # noqa: F401  (must come first: quiets TensorFlow)

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one sub-directory per size).")
_FIELD = flags.DEFINE_string("field", "model.width", "Config field that sets the size, e.g. model.depth.")
_VALUES = flags.DEFINE_list("values", ["8", "16", "64", "256"], "Values of --field, smallest first.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per value: config.seed, config.seed + 1, ...")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from resmem_jax import settings  # pylint: disable=g-import-not-at-top
  from resmem_jax.jobs import report, sweeps  # pylint: disable=g-import-not-at-top
  values = [float(v) if "." in v else int(v) for v in _VALUES.value]
  with common_flags.user_errors():
    out = sweeps.model_size_sweep(settings.from_config(_CONFIG.value), _WORKDIR.value,
                                  _FIELD.value, values, seeds=_SEEDS.value)
  print(report.format_sweep(out, _FIELD.value))


if __name__ == "__main__":
  common_flags.run(main)
