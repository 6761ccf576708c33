"""Training ResMem's base network: data-parallel, checkpointed, deterministic for a seed.

  state.py          TrainState, cheap-compiled parameter init
  optimizer.py      schedule lengths, the learning-rate schedule (built once), the optax optimiser
  steps.py          cross-entropy, masked loss sums, the train and eval steps
  checkpoints.py    Orbax save / restore, model_info.json, ``restore_model``
  metric_writer.py  metrics.jsonl + TensorBoard (process 0), truncated on resume
  loop.py           ``train_and_evaluate`` and ``evaluate``
  provenance.py     WORKDIR/run.json: what the model was trained with, checked before a rerun
  trained.py        ``train_model``: provenance + training + content digest

``train_model(settings, dataset, workdir)`` (what the binaries and the engine call) checks the
workdir's record, trains or resumes with ``train_and_evaluate`` and returns the model it trained
(a run finished before is restored from its last checkpoint).
Training writes:

  WORKDIR/checkpoints/     Orbax checkpoints (periodic + final); a rerun resumes from the latest
  WORKDIR/metrics.jsonl    one JSON record per log / evaluation event
  WORKDIR/tensorboard/     TensorBoard summaries (tensorboardX)
  WORKDIR/model_info.json  what ``restore_model`` needs to rebuild the module without the data
  WORKDIR/run.json         the settings and versions the model was trained with, its digest
"""
from __future__ import annotations

from resmem_jax.training.checkpoints import CheckpointError, restore_model
from resmem_jax.training.loop import TrainResult, train_and_evaluate
from resmem_jax.training.provenance import WorkdirError
from resmem_jax.training.trained import TrainedModel, train_model

__all__ = ["train_model", "TrainedModel", "train_and_evaluate", "TrainResult", "restore_model",
           "WorkdirError", "CheckpointError"]
