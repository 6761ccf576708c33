"""Checks of the settings that ask the registries (data sets, models, memory backends).

:mod:`resmem_jax.settings` checks every field's type and range on its own and imports no
registry; the registries import it. The checks that need a registry's answer live here, above
them, so imports point one way (``tests/test_imports.py``):

* :func:`check`: registry names and per-component options, before anything is read (seconds);
* :func:`check_against_data`: what only the data set's shape and sizes tell, before training;
* :func:`check_training_fits`: a model and batches that fit in memory, before allocating them.
"""
from __future__ import annotations

import functools
import math

import jax
import numpy as np

from resmem_jax import data
from resmem_jax import memory
from resmem_jax import models
from resmem_jax import settings as settings_lib
from resmem_jax.settings import (MissingDependency, ModelSettings, Settings, SettingsError,
                                 TrainSettings)


def check(settings: Settings) -> None:
  """Registry names and per-component options, still without data or training (seconds).

  The data set name, the model (built without parameters), the memory backend, its options and
  the residual format. Raises SettingsError.
  """
  try:
    data.check_name(settings.data.name)
    models.check_settings(settings.model)
    memory.check_options(settings.resmem.backend, settings.resmem.backend_options,
                         settings.resmem.residual_format, settings.resmem.key_format)
  except (SettingsError, MissingDependency):
    raise
  except ValueError as err:
    raise SettingsError(str(err)) from None
  r = settings.resmem
  if r.tune_recall is not None and r.backend != "scann":
    raise SettingsError(f"resmem.tune_recall tunes ScaNN's query settings; resmem.backend is "
                        f"{r.backend!r} (set resmem.backend=scann or unset resmem.tune_recall)")
  if settings.data.val_fraction == 0 and settings_lib.needs_validation(r):
    raise SettingsError(settings_lib.validation_needed_message(r))


def memory_rows(info) -> int:
  """The most rows a memory of the training split can hold: one per example, or one per token of
  a text sequence (padding tokens are left out, so a text memory can hold fewer)."""
  per_example = math.prod(info.input_shape) if info.input_dtype == "int32" else 1
  return int(info.split_sizes.get("train", 0)) * int(per_example)


def memory_bytes() -> tuple[int, str]:
  """``(bytes, what)``: one device's memory (accelerators report it) or else the host's RAM."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # backends without memory statistics
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"memory of one {device.platform} device"
  return settings_lib.host_memory_bytes(), "this host's memory"


# Optimizer states kept per parameter beside it (sgd: the momentum, unless 0).
def _optimizer_slots(t: TrainSettings) -> int:
  return 2 if t.optimizer in ("adam", "adamw") else int(t.momentum > 0)


def parameter_count(model: ModelSettings, info) -> int:
  """The model's parameter count from its shapes alone (nothing is allocated)."""
  return _parameter_count(model, int(info.num_classes), tuple(info.input_shape),
                          str(info.input_dtype))


@functools.lru_cache(maxsize=16)  # the engine and the training loop both ask, once per run
def _parameter_count(model: ModelSettings, num_classes: int, input_shape: tuple,
                     input_dtype: str) -> int:
  module = models.build_model(model, num_classes)
  sample = np.zeros((1,) + input_shape, np.dtype(input_dtype))
  shapes = jax.eval_shape(
      lambda key: module.init({"params": key, "dropout": key}, sample, train=False),
      jax.random.key(0))
  shapes = shapes.get("params", shapes)
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))


def check_training_fits(model: ModelSettings, train: TrainSettings, info) -> None:
  """Before training: a training split that is not empty, and a model and batches that can fit
  in memory (lower bounds: parameters, gradients and optimizer slots at 4 bytes each; a batch's
  inputs). ``info`` is the data set's ``DatasetInfo``. Raises SettingsError."""
  if info.split_sizes.get("train", 0) == 0:
    raise SettingsError(f"the training split of {info.name} is empty (data.val_fraction or "
                        f"data.train_fraction leave no example to train on); lower "
                        f"data.val_fraction")
  try:
    params = parameter_count(model, info)
  except (OverflowError, MemoryError) as err:
    raise SettingsError(f"model.width={model.width:g}, model.depth={model.depth} give a model too "
                        f"large to describe ({err}); lower model.width") from None
  copies = 2 + _optimizer_slots(train)
  need = params * 4 * copies
  available, where = memory_bytes()
  if need > available:
    slots = f", {copies - 2} optimizer slot{'s' * (copies > 3)}" if copies > 2 else ""
    count = f"{params:,}" if params < 10**12 else f"{params:.3g}"
    raise SettingsError(
        f"model.width={model.width:g}, model.depth={model.depth}: the {model.name} has {count} "
        f"parameters, x 4 bytes x {copies} (parameters, gradients{slots}) = {need / 1e9:.3g} GB, "
        f"more than the {available / 1e9:.3g} GB of {where}; lower model.width or model.depth")
  itemsize = np.dtype(info.input_dtype).itemsize
  for path, batch in (("train.batch_size", train.batch_size),
                      ("train.eval_batch_size", train.eval_batch_size)):
    settings_lib.check_batch_fits(path, batch, info.input_shape, itemsize)


def check_against_data(settings: Settings, info) -> None:
  """What only the data set's shape and sizes tell, still before training (seconds): a training
  split that is not empty and large enough for k (or some k of the grid), a model and batches
  that can fit in memory, a ScaNN index that can be trained on the rows. ``info`` is the data
  set's ``DatasetInfo``. Raises SettingsError."""
  d, r = settings.data, settings.resmem
  sizes = info.split_sizes
  if sizes.get("train", 0) == 0:
    given = sizes.get("train", 0) + sizes.get("validation", 0)
    raise SettingsError(
        f"the training split is empty: data.val_fraction={d.val_fraction:g} leaves "
        f"{sizes.get('validation', 0):,} of the {given:,} training examples for validation and "
        f"none to train on; lower data.val_fraction")
  rows = memory_rows(info)
  settings_lib.check_neighbours(r, rows)
  try:
    memory.check_size(r.backend, rows, r.backend_options)
  except ValueError as err:
    raise SettingsError(f"resmem.backend_options={r.backend_options!r}: {err}") from None
  check_training_fits(settings.model, settings.train, info)
  settings_lib.check_batch_fits("resmem.eval_batch_size", r.eval_batch_size, info.input_shape,
                   np.dtype(info.input_dtype).itemsize)
