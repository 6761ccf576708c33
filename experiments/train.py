"""Train a base model only: ``resmem-jax-train``.

``python -m experiments.train`` from a checkout runs the same tool (resmem_jax/cli/train.py);
``--help`` lists its flags.
"""
from resmem_jax.cli import train

if __name__ == "__main__":
  train.run()
