r"""Language modelling: ResMem and kNN-LM on one per-token memory, beside the base LM.

  python -m experiments.resmem_lm --config=experiments/configs/tiny_shakespeare.py --workdir=/tmp/ts
  python -m experiments.resmem_lm --config=experiments/configs/tiny_shakespeare.py:tiny \
      --workdir=/tmp/ts_tiny --config.resmem.backend=scann --config.resmem.k=4

The same engine as ``experiments.resmem`` (a memory row per training token instead of per example):
trains the Transformer (resuming from WORKDIR/checkpoints), builds the memory over every training
token, chooses k, sigma, T and kNN-LM's lambda on the validation split and writes
WORKDIR/results.json plus a printed table.
"""
from experiments import common_flags  # noqa: F401  (must come first: quiets TensorFlow)

from absl import app

from experiments import resmem

if __name__ == "__main__":
  common_flags.run(resmem.main)
