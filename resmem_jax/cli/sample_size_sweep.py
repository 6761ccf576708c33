r"""ResMem vs base test (and train) accuracy against the fraction of the training set -> JSON + PNG.

  resmem-jax-sample-size-sweep --config=mnist:mlp \
      --config.data.manual_dir=/path/to/mnist_archives --fractions=0.1,0.25,0.5,1 \
      --workdir=/tmp/mnist_sample_sweep
"""
from resmem_jax.cli import flags as cli_flags  # first: quiets TensorFlow before it loads

from absl import app
from absl import flags

_CONFIG = cli_flags.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one sub-directory per fraction).")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.1", "0.25", "0.5", "1.0"], "Training-set fractions.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per value: config.seed, config.seed + 1, ...")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from resmem_jax import settings  # pylint: disable=g-import-not-at-top
  from resmem_jax.jobs import report, sweeps  # pylint: disable=g-import-not-at-top
  out = sweeps.sample_size_sweep(settings.from_config(_CONFIG.value), _WORKDIR.value,
                                 [float(f) for f in _FRACTIONS.value], seeds=_SEEDS.value)
  print(report.format_sweep(out, "data.train_fraction"))
  print(f"results: {_WORKDIR.value}/sample_size_sweep.json and sample_size_sweep.png")


TOOL = cli_flags.Tool(
    command="resmem-jax-sample-size-sweep",
    about=(
        "ResMem vs base test (and train) accuracy against the fraction of the training set used:\n"
        "one resmem-jax run per fraction and seed, in WORKDIR/sample_size_sweep.json and .png."),
    example=("resmem-jax-sample-size-sweep --config=digits:tiny --fractions=0.25,1"
        " --workdir=/tmp/digits_sample_sweep"))


def run():
  cli_flags.run(main, TOOL)


if __name__ == "__main__":
  run()
