"""``resmem-jax``: train (or reuse) a base model, memorize its residuals, report base vs ResMem.

  resmem-jax --config=digits --workdir=/tmp/resmem_digits
  resmem-jax --config=mnist --config.data.manual_dir=/path/to/mnist_archives --workdir=/tmp/mnist
  resmem-jax --config=tiny_shakespeare --workdir=/tmp/ts        # a language model + kNN-LM

Any TFDS image classification set runs with ``--config.data.name=NAME`` (e.g. svhn_cropped).
Rerunning the same command resumes training from WORKDIR/checkpoints and reuses WORKDIR/memory;
a rerun whose settings would change the trained model is refused (``--start_over`` moves the
earlier run to WORKDIR/superseded/ and trains again), while ``resmem.*`` fields may change freely
(the memory is rebuilt when they do). ``--print_config`` lists every field with its meaning.
"""
from resmem_jax.cli import flags as cli_flags  # first: quiets TensorFlow before it loads

from absl import app
from absl import flags

_CONFIG = cli_flags.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, memory and results.")
_START_OVER = flags.DEFINE_bool("start_over", False, "Move an earlier run in --workdir to "
                                "WORKDIR/superseded/<time>/ (nothing is deleted) and train afresh.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (a directory for checkpoints, memory, results)")
  from resmem_jax import settings  # pylint: disable=g-import-not-at-top
  from resmem_jax.jobs import engine, report  # pylint: disable=g-import-not-at-top
  results = engine.run(settings.from_config(_CONFIG.value), _WORKDIR.value,
                       start_over=_START_OVER.value)
  print(report.format_table(results))
  print(f"results: {_WORKDIR.value}/results.json")


TOOL = cli_flags.Tool(
    command="resmem-jax",
    about=(
        "Train (or reuse) a base model, memorize its training residuals, and report base vs ResMem\n"
        "accuracy on the test set (images; language models get a kNN-LM beside ResMem)."),
    example=("resmem-jax --config=digits --workdir=/tmp/resmem_digits"))


def run():
  cli_flags.run(main, TOOL)


if __name__ == "__main__":
  run()
