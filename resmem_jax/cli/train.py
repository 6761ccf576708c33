"""``resmem-jax-train``: train a base model only.

  resmem-jax-train --config=digits --workdir=/tmp/digits
  resmem-jax-train --config=mnist --config.data.manual_dir=/path/to/mnist_archives --workdir=/tmp/mnist

Rerunning the same command resumes from WORKDIR/checkpoints. Any config field can be overridden
with ``--config.FIELD=VALUE``; the config is checked before any data is read, and a rerun whose
settings would change the trained model is refused (``--start_over`` moves the earlier run to
WORKDIR/superseded/ and trains again).
"""
from resmem_jax.cli import flags as cli_flags  # first: quiets TensorFlow before it loads

from absl import app
from absl import flags

_CONFIG = cli_flags.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_START_OVER = flags.DEFINE_bool("start_over", False, "Move an earlier run in --workdir to "
                                "WORKDIR/superseded/<time>/ (nothing is deleted) and train afresh.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (a directory for checkpoints and metrics)")
  from resmem_jax import data, settings, training, validate  # pylint: disable=g-import-not-at-top
  s = settings.from_config(_CONFIG.value)
  validate.check(s)
  model = training.train_model(s, data.get_dataset(s.data), _WORKDIR.value,
                               start_over=_START_OVER.value)
  print({k: round(v, 5) if isinstance(v, float) else v for k, v in model.metrics.items()})


TOOL = cli_flags.Tool(
    command="resmem-jax-train",
    about=(
        "Train a base model only (no memory), resuming from WORKDIR/checkpoints on a rerun,\n"
        "and print its metrics."),
    example=("resmem-jax-train --config=digits --workdir=/tmp/digits"))


def run():
  cli_flags.run(main, TOOL)


if __name__ == "__main__":
  run()
