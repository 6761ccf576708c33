r"""Train (or reuse) a base model, memorize its residuals, report base vs ResMem test risk.

  python -m experiments.resmem --config=experiments/configs/digits.py --workdir=/tmp/resmem_digits
  python -m experiments.resmem --config=experiments/configs/mnist.py \
      --config.data.manual_dir=/path/to/mnist_archives --workdir=/tmp/mnist_cnn

Any TFDS image classification set runs with ``--config.data.name=NAME`` (e.g. svhn_cropped).
Rerunning the same command resumes training from WORKDIR/checkpoints and reuses WORKDIR/memory;
a rerun whose settings would change the trained model is refused (``--start_over`` moves the
earlier run to WORKDIR/superseded/ and trains again), while ``resmem.*`` fields may change freely
(the memory is rebuilt when they do).
"""
from experiments import common_flags  # noqa: F401  (must come first: quiets TensorFlow)

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, memory and results.")
_START_OVER = flags.DEFINE_bool("start_over", False, "Move an earlier run in --workdir to "
                                "WORKDIR/superseded/<time>/ (nothing is deleted) and train afresh.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from resmem_jax import settings  # pylint: disable=g-import-not-at-top
  from resmem_jax.jobs import engine, report  # pylint: disable=g-import-not-at-top
  with common_flags.user_errors():
    results = engine.run(settings.from_config(_CONFIG.value), _WORKDIR.value,
                         start_over=_START_OVER.value)
  print(report.format_table(results))


if __name__ == "__main__":
  common_flags.run(main)
