r"""Train (or reuse) a base model, memorize its residuals, report base vs ResMem test risk.

  python -m experiments.resmem --config=experiments/configs/digits.py --workdir=/tmp/resmem_digits
  python -m experiments.resmem --config=experiments/configs/mnist.py \
      --config.data.manual_dir=../shared/datasets/mnist --workdir=/tmp/mnist_mlp
"""
from absl import app, flags
from ml_collections import config_flags

from experiments import common_flags  # noqa: F401  (quiet TF logging before heavy imports)

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, memory and results")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from resmem_jax import pipeline
  pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
