"""Trains a base model: ``python -m experiments.train --config=CONFIG.py[:VARIANT] --workdir=DIR``.

  python -m experiments.train --config=experiments/configs/digits.py --workdir=/tmp/digits
  python -m experiments.train --config=experiments/configs/mnist.py --workdir=/tmp/mnist \
      --config.data.manual_dir=../shared/datasets/mnist --config.data.data_dir=/tmp/tfds

Rerunning the same command resumes from DIR/checkpoints. Any config field can be overridden
with ``--config.FIELD=VALUE``; the config is checked before any data is read, and a rerun whose
settings would change the trained model is refused (``--start_over`` moves the earlier run to
DIR/superseded/ and trains again).
"""
from experiments import common_flags  # noqa: F401  (must come first: quiets TensorFlow)

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from resmem_jax import data
from resmem_jax import settings as settings_lib
from resmem_jax import training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_START_OVER = flags.DEFINE_bool("start_over", False, "Move an earlier run in --workdir to "
                                "WORKDIR/superseded/<time>/ (nothing is deleted) and train afresh.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  with common_flags.user_errors():
    settings = settings_lib.from_config(_CONFIG.value)
    settings_lib.check(settings)
    dataset = data.get_dataset(settings.data)
    model = training.train_model(settings, dataset, _WORKDIR.value, start_over=_START_OVER.value)
  print({k: round(v, 5) if isinstance(v, float) else v for k, v in model.metrics.items()})


if __name__ == "__main__":
  common_flags.run(main)
