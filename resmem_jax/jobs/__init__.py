"""Jobs: the engine that runs ResMem end to end, and the experiments built on it.

  engine.py   what a workdir adds to ``resmem_jax.fitting``: training, the saved memory unit,
              results.json (train/restore -> memory -> selection -> evaluation)
  report.py   the printed tables of a results.json
  sweeps.py   model-size and training-set-size sweeps (one engine run per variant)
  theory.py   the paper's stylized linear regression (base vs ResMem test risk against n)
"""
