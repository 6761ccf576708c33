"""A trained base model from a workdir: provenance checked, trained or resumed, restored, digested.

The one entry point the binaries and the job engine use:

    model = train_model(settings, dataset, workdir)

checks the workdir's record (``provenance.py``) before any work, trains or resumes (or returns at
once when training has finished) and ties the final variables to the record by their content
digest. The variables are the state the loop trained, kept in memory; only a run that had
finished before this call (a reused or rerun workdir) reads them back from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np

from resmem_jax import settings as settings_lib
from resmem_jax.training import checkpoints
from resmem_jax.training import provenance
from resmem_jax.training import workdir_lock
from resmem_jax.training.loop import train_and_evaluate


@dataclasses.dataclass
class TrainedModel:
  module: Any          # the flax Module; apply(variables, x, train=False) -> (logits, embedding)
  variables: Any       # host arrays: params (and batch_stats)
  step: int            # the final checkpoint's step
  digest: str          # sha256 of the variables' content (provenance.variables_digest)
  metrics: dict        # train_and_evaluate's final metrics


def train_model(settings: settings_lib.Settings, dataset, workdir: str | os.PathLike, *,
                start_over: bool = False, progress: bool = True,
                lock_scope: contextlib.ExitStack | None = None) -> TrainedModel:
  """Trains (or resumes, or reuses) the model ``settings`` describe in ``workdir``.

  Raises ``provenance.WorkdirError`` before any work when the workdir holds a model trained with
  other settings (``start_over`` moves that run to WORKDIR/superseded/ first), or when another run
  holds the workdir (one writer per workdir: ``workdir_lock.py``). The lock is released on return,
  or, given ``lock_scope``, when that scope closes. A multi-host run has joined its processes
  before (``mesh.initialize_distributed``: the command-line tools do it once per process).
  """
  workdir = pathlib.Path(workdir)
  with contextlib.ExitStack() as own_scope:
    (lock_scope or own_scope).enter_context(workdir_lock.hold(workdir, jax.process_index()))
    return _train_model(settings, dataset, workdir, start_over, progress)


def _train_model(settings, dataset, workdir: pathlib.Path, start_over: bool,
                 progress: bool) -> TrainedModel:
  provenance.prepare(workdir, settings, start_over=start_over)
  start = time.perf_counter()
  result = train_and_evaluate(dataset, settings.model, settings.train, settings.seed, workdir,
                              progress=progress)
  metrics = result.metrics
  if result.state is None:  # finished before this call: nothing in memory, the model is on disk
    module, variables, step = checkpoints.restore_model(workdir, settings.model,
                                                        settings.train.dtype)
    variables = jax.tree_util.tree_map(np.asarray, variables)
  else:  # the state just trained: the same values as the final checkpoint, not read back
    module, variables = result.module, checkpoints.host_copy(result.state.variables())
    step = int(checkpoints.host_copy(result.state.step))
  digest = provenance.variables_digest(variables)
  provenance.check_checkpoint(workdir, step, digest)
  test = (f", test accuracy {100 * metrics['test_accuracy']:.2f}%"
          if "test_accuracy" in metrics else "")
  logging.getLogger("resmem_jax").info(
      "training: %s with %s parameters, %d steps in %.1f s (checkpoints in %s)%s",
      settings.model.name, f"{metrics.get('num_params', 0):,}", step, time.perf_counter() - start,
      workdir / "checkpoints", test)
  return TrainedModel(module, variables, step, digest, metrics)
