"""Train (or reuse) a base model, memorize its residuals, report base vs ResMem: ``resmem-jax``.

``python -m experiments.resmem`` from a checkout runs the same tool (resmem_jax/cli/main.py);
``--help`` lists its flags.
"""
from resmem_jax.cli import main

if __name__ == "__main__":
  main.run()
