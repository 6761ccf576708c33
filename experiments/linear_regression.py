"""The paper's stylized linear regression: ``resmem-jax-theory``.

``python -m experiments.linear_regression`` from a checkout runs the same tool (resmem_jax/cli/theory.py);
``--help`` lists its flags.
"""
from resmem_jax.cli import theory

if __name__ == "__main__":
  theory.run()
