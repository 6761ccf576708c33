"""Base vs ResMem against model size: ``resmem-jax-model-size-sweep``.

``python -m experiments.model_size_sweep`` from a checkout runs the same tool (resmem_jax/cli/model_size_sweep.py);
``--help`` lists its flags.
"""
from resmem_jax.cli import model_size_sweep

if __name__ == "__main__":
  model_size_sweep.run()
