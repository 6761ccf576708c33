"""Jobs: the engine that runs ResMem end to end, and the experiments built on it.

  engine.py   train/restore -> inference -> memory -> selection -> evaluation -> results.json
  report.py   the printed tables of a results.json
  sweeps.py   model-size and training-set-size sweeps (one engine run per variant)
  theory.py   the paper's stylized linear regression (base vs ResMem test risk against n)
"""
