"""The training loop: data-parallel jit steps, periodic evaluation, checkpoints and metrics.

One code path serves one CPU, several GPUs and multi-host TPU slices: a 1-D ``data`` mesh over
all devices, the batch split along it and the train state replicated. Runs are deterministic for
a seed: parameter init and dropout keys derive from the seed and the step number, and the input
iterator is restarted at the resumed step, so a killed and rerun job ends with the same
parameters and metrics.jsonl as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax import compiler_options
from resmem_jax import mesh as mesh_lib
from resmem_jax import models
from resmem_jax import validate
from resmem_jax.settings import ModelSettings, SettingsError, TrainSettings
from resmem_jax.training import checkpoints
from resmem_jax.training import optimizer as optimizer_lib
from resmem_jax.training import state as state_lib
from resmem_jax.training import steps
from resmem_jax.training.metric_writer import MetricWriter, final_record


def _check(train: TrainSettings) -> None:
  if train.batch_size < 1:
    raise ValueError(f"train.batch_size must be positive, got {train.batch_size}")
  if train.num_steps <= 0 and train.num_epochs <= 0:
    raise ValueError("train.num_epochs (or train.num_steps) must be positive")


class TrainingDiverged(SettingsError):
  """The training loss or parameters became NaN or inf: the settings make training diverge.

  A SettingsError (the tools print it as one line): the fix is a smaller learning rate or float32.
  """


def _diverged(train: TrainSettings, step: int, what: str, kept: int | None) -> TrainingDiverged:
  dtype = f" or train.dtype=float32 (now {train.dtype})" if train.dtype != "float32" else ""
  saved = (f"the checkpoint of step {kept} (finite) is kept" if kept is not None
           else "no checkpoint was written")
  return TrainingDiverged(f"training diverged: {what} at step {step}; set a smaller "
                          f"train.learning_rate (now {train.learning_rate:g}){dtype}; {saved}")


@jax.jit
def _all_finite(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def evaluate(eval_fn: Callable, variables, batches: Iterator[dict], mesh) -> dict:
  """Masked mean loss and accuracy over a finite iterator of (padded) batches."""
  totals = None
  for batch in batches:
    sums = eval_fn(variables, mesh_lib.shard_batch(steps.model_batch(batch), mesh))
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  if totals is None:
    return {"loss": float("nan"), "accuracy": float("nan"), "count": 0.0}
  totals = mesh_lib.to_host(totals)
  count = float(totals["count"])
  return {"loss": float(totals["loss"]) / max(count, 1.0),
          "accuracy": float(totals["correct"]) / max(count, 1.0), "count": count}


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What :func:`train_and_evaluate` ends with.

  ``state`` is the state the loop trained to its last step, the same values as the final
  checkpoint it wrote (so nothing needs to be read back); None when the workdir's run had
  already finished and nothing was trained (its variables are on disk: ``restore_model``).
  """
  metrics: dict                         # step, num_params, train_* and validation_* / test_*
  module: Any                           # the flax Module the state belongs to
  state: state_lib.TrainState | None    # replicated over the data mesh


def train_and_evaluate(dataset, model: ModelSettings, train: TrainSettings, seed: int,
                       workdir: str | os.PathLike, *, progress: bool = True) -> TrainResult:
  """Trains (resuming from WORKDIR/checkpoints if present); returns the metrics and final state.

  ``dataset`` is a ``resmem_jax.data`` Dataset (``info``, ``train_batches``, ``eval_batches``).
  The metrics are a dict with ``step``, ``num_params``, ``train_loss``, ``train_accuracy`` (mean
  over the last logging window) and ``validation_*`` / ``test_*`` loss and accuracy when those
  splits exist. A finished run returns its recorded final metrics without training again (and
  no state). ``progress`` shows a progress bar (on process 0, when stderr is a terminal).

  A multi-host run joins its processes first (``mesh.initialize_distributed``, which the
  command-line tools call once per process).
  """
  _check(train)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  info = dataset.info

  mesh = mesh_lib.data_mesh()
  multiple = mesh_lib.num_data_shards(mesh)
  if train.batch_size % multiple:
    raise ValueError(f"train.batch_size={train.batch_size} must be a multiple of the "
                     f"{multiple} devices")
  eval_batch_size = mesh_lib.pad_to_multiple(train.eval_batch_size, multiple)
  module = models.build_model(model, info.num_classes, dtype=train.dtype)
  steps_per_epoch, total_steps = optimizer_lib.schedule_lengths(train, info.split_sizes)
  schedule = optimizer_lib.make_schedule(train, steps_per_epoch, total_steps)
  tx = optimizer_lib.make_optimizer(train, schedule)
  sample = np.zeros((1,) + tuple(info.input_shape), np.dtype(info.input_dtype))
  # Before any allocation: a model or batch too large for the memory is one line, not an abort.
  validate.check_training_fits(model, train, info)
  state = state_lib.init_state(module, tx, sample, seed, mesh)
  num_params = models.count_params(state.params)
  if jax.process_index() == 0:
    checkpoints.write_model_info(workdir, info, num_params)

  manager = checkpoints.checkpoint_manager(workdir, train.max_checkpoints_to_keep)
  latest = manager.latest_step()
  if latest == total_steps:
    finished = final_record(workdir)
    if finished is not None:  # a finished run: nothing to train or evaluate again
      manager.close()
      return TrainResult(finished, module, None)
  if latest is not None:
    state = checkpoints.restore(manager, latest, state)
    logging.info("Resumed from %s at step %d", workdir / checkpoints.CHECKPOINT_DIR, latest)
  start_step = int(jax.device_get(state.step))
  writer = MetricWriter(workdir, latest)
  logging.info("%s: %d params, %d steps (%s per epoch), batch %d over %d devices", model.name,
               num_params, total_steps, steps_per_epoch or "not counted", train.batch_size,
               multiple)

  dropout_key = jax.random.fold_in(jax.random.key(seed), 1)
  replicated = mesh_lib.replicated(mesh)
  options = compiler_options.for_model(model, mesh)
  train_step = jax.jit(steps.make_train_step(module, tx, train.label_smoothing, dropout_key),
                       out_shardings=(replicated, replicated), donate_argnums=0,
                       compiler_options=options)
  eval_step = jax.jit(steps.make_eval_step(module), out_shardings=replicated,
                      compiler_options=options)

  def run_eval(split):
    return evaluate(eval_step, state.variables(), dataset.eval_batches(split, eval_batch_size),
                    mesh)

  has_validation = info.split_sizes.get("validation", 0) > 0
  eval_every = train.eval_every_steps or steps_per_epoch

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  show_bar = progress and jax.process_index() == 0 and sys.stderr.isatty()
  bar = tqdm(total=total_steps, initial=start_step, disable=not show_bar, desc="train", leave=False)
  batches = dataset.train_batches(train.batch_size, seed, start_step=start_step)
  window, window_start, last_train = [], time.perf_counter(), {}
  # A diverged run stops at the first logging point (or checkpoint) whose losses are NaN or inf:
  # the host already syncs there, so finite runs pay nothing per step.
  kept = latest  # the newest checkpoint on disk

  def stop(error: TrainingDiverged) -> TrainingDiverged:
    bar.close()
    manager.close()  # waits for a checkpoint still being written (a finite one)
    writer.close()
    return error

  for step in range(start_step, total_steps):
    batch = mesh_lib.shard_batch(steps.model_batch(next(batches)), mesh)
    state, step_metrics = train_step(state, batch)
    window.append(step_metrics)
    done = step + 1
    bar.update(1)
    if done % train.log_every_steps == 0 or done == total_steps:
      host = mesh_lib.to_host(window)
      elapsed = time.perf_counter() - window_start
      losses = np.array([m["loss"] for m in host], np.float64)
      if not np.all(np.isfinite(losses)):
        bad = int(np.argmin(np.isfinite(losses)))  # the window's first non-finite loss
        raise stop(_diverged(train, done - len(losses) + bad + 1,
                             f"the train loss is {losses[bad]}", kept))
      last_train = {"train_loss": float(np.mean(losses)),
                    "train_accuracy": float(np.mean([m["accuracy"] for m in host]))}
      writer.write(done, {**last_train, "learning_rate": float(schedule(step))})
      logging.info("step %d/%d: train loss %.4f acc %.4f (%.1f steps/s)", done, total_steps,
                   last_train["train_loss"], last_train["train_accuracy"], len(window) / elapsed)
      bar.set_postfix(loss=f"{last_train['train_loss']:.4f}")
      window, window_start = [], time.perf_counter()
    if has_validation and (done % eval_every == 0 or done == total_steps):
      result = run_eval("validation")
      writer.write(done, {"validation_loss": result["loss"],
                          "validation_accuracy": result["accuracy"]})
      logging.info("step %d: validation loss %.4f acc %.4f", done, result["loss"],
                   result["accuracy"])
    if done % train.checkpoint_every_steps == 0 or done == total_steps:
      # Never replace a finite checkpoint with a diverged state: the losses since the last
      # logging point and the parameters themselves (the last update's result) must be finite.
      losses = np.array([m["loss"] for m in mesh_lib.to_host(window)], np.float64)
      if not (np.all(np.isfinite(losses)) and bool(mesh_lib.to_host(_all_finite(state.params)))):
        raise stop(_diverged(train, done, "the parameters or the train loss are NaN or inf", kept))
      checkpoints.save(manager, state, force=done == total_steps)
      kept = done
  bar.close()
  manager.wait_until_finished()
  manager.close()

  final = {"step": total_steps, "num_params": num_params, **last_train}
  splits = ["validation"] if has_validation else []
  if train.eval_test_at_end and info.split_sizes.get("test", 0) > 0:
    splits.append("test")
  for split in splits:
    result = run_eval(split)
    final[f"{split}_loss"], final[f"{split}_accuracy"] = result["loss"], result["accuracy"]
  writer.write(total_steps, {k: v for k, v in final.items() if k != "step"}, final=True)
  writer.close()
  logging.info("final: %s", final)
  return TrainResult(final, module, state)
