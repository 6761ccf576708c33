r"""ResMem vs base test accuracy against model size (one engine run per size and seed) -> JSON + PNG.

  resmem-jax-model-size-sweep --config=mnist:mlp \
      --config.data.manual_dir=/path/to/mnist_archives --field=model.width --values=8,16,64,256 \
      --workdir=/tmp/mnist_size_sweep
"""
from resmem_jax.cli import flags as cli_flags  # first: quiets TensorFlow before it loads

from absl import app
from absl import flags

_CONFIG = cli_flags.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one sub-directory per size).")
_FIELD = flags.DEFINE_string("field", "model.width", "Config field that sets the size, e.g. model.depth.")
_VALUES = flags.DEFINE_list("values", ["8", "16", "64", "256"], "Values of --field, smallest first.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per value: config.seed, config.seed + 1, ...")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from resmem_jax import settings  # pylint: disable=g-import-not-at-top
  from resmem_jax.jobs import report, sweeps  # pylint: disable=g-import-not-at-top
  values = [float(v) if "." in v else int(v) for v in _VALUES.value]
  out = sweeps.model_size_sweep(settings.from_config(_CONFIG.value), _WORKDIR.value,
                                _FIELD.value, values, seeds=_SEEDS.value)
  print(report.format_sweep(out, _FIELD.value))
  print(f"results: {_WORKDIR.value}/model_size_sweep.json and model_size_sweep.png")


TOOL = cli_flags.Tool(
    command="resmem-jax-model-size-sweep",
    about=(
        "ResMem vs base test accuracy against model size: one resmem-jax run per value of --field\n"
        "and seed, summed up in WORKDIR/model_size_sweep.json and .png."),
    example=("resmem-jax-model-size-sweep --config=digits:tiny --field=model.width --values=8,32"
        " --workdir=/tmp/digits_size_sweep"))


def run():
  cli_flags.run(main, TOOL)


if __name__ == "__main__":
  run()
