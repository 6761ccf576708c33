r"""Selection rules compared on validation rows only (how the defaults are chosen, never on test).

Runs on a finished sweep's trained models (their checkpoints are reused), with the sweep's own
flags:

    python -m experiments.selection_study --config=mnist:mlp \
        --config.data.manual_dir=PATH/TO/mnist --config.data.data_dir=/tmp/tfds \
        --config.train.num_epochs=5 --config.model.depth=1 \
        --field=model.width --values=8,16,64,256 --seeds=3 --workdir=/tmp/runs/mlp

It prints every rule's held-out validation accuracy gain and log-loss change (cross-fitted on the
two validation folds) and writes WORKDIR/selection_study.json.
"""
from resmem_jax.cli import flags as cli_flags  # first: quiets TensorFlow before it loads

from absl import app
from absl import flags

_CONFIG = cli_flags.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory (its runs are reused).")
_FIELD = flags.DEFINE_string("field", "model.width", "The sweep's --field.")
_VALUES = flags.DEFINE_list("values", ["8", "16", "64", "256"], "The sweep's --values.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "The sweep's --seeds.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from resmem_jax import settings  # pylint: disable=g-import-not-at-top
  from resmem_jax.jobs import selection_study  # pylint: disable=g-import-not-at-top
  values = [float(v) if "." in v else int(v) for v in _VALUES.value]
  out = selection_study.run_study(settings.from_config(_CONFIG.value), _WORKDIR.value,
                                  _FIELD.value, values, _SEEDS.value)
  print(selection_study.format_study(out))
  print(f"results: {_WORKDIR.value}/selection_study.json")


if __name__ == "__main__":
  cli_flags.run(main)
