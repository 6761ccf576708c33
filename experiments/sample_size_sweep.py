"""Base vs ResMem against training-set size: ``resmem-jax-sample-size-sweep``.

``python -m experiments.sample_size_sweep`` from a checkout runs the same tool (resmem_jax/cli/sample_size_sweep.py);
``--help`` lists its flags.
"""
from resmem_jax.cli import sample_size_sweep

if __name__ == "__main__":
  sample_size_sweep.run()
