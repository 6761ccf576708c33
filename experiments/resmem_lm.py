"""Language models through the same engine as ``resmem`` (kNN-LM beside ResMem): ``resmem-jax``.

``python -m experiments.resmem_lm`` from a checkout runs the same tool (resmem_jax/cli/main.py);
``--help`` lists its flags.
"""
from resmem_jax.cli import main

if __name__ == "__main__":
  main.run()
