"""Training ResMem's base network: data-parallel, checkpointed, deterministic for a seed.

  state.py          TrainState, cheap-compiled parameter init
  optimizer.py      schedule lengths, the learning-rate schedule (built once), the optax optimiser
  steps.py          cross-entropy, masked loss sums, the train and eval steps
  checkpoints.py    Orbax save / restore, model_info.json, ``restore_model``
  metric_writer.py  metrics.jsonl + TensorBoard (process 0), truncated on resume
  loop.py           ``train_and_evaluate`` and ``evaluate``

``train_and_evaluate(dataset, settings.model, settings.train, settings.seed, workdir)`` writes:

  WORKDIR/checkpoints/     Orbax checkpoints (periodic + final); a rerun resumes from the latest
  WORKDIR/metrics.jsonl    one JSON record per log / evaluation event
  WORKDIR/tensorboard/     TensorBoard summaries (tensorboardX)
  WORKDIR/model_info.json  what ``restore_model`` needs to rebuild the module without the data
"""
from __future__ import annotations

from resmem_jax.training.checkpoints import restore_model
from resmem_jax.training.loop import train_and_evaluate

__all__ = ["train_and_evaluate", "restore_model"]
