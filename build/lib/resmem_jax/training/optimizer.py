"""The learning-rate schedule and the optax optimiser built on it.

The schedule is built once per run (:func:`make_schedule`) and handed both to the optimiser and
to the loop, which logs the rate it applies.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import optax

from resmem_jax.settings import TrainSettings


def schedule_lengths(train: TrainSettings, split_sizes: Mapping[str, int]) -> tuple[int, int]:
  """(steps per epoch, total steps); the training split is counted only when epochs matter.

  With ``num_steps`` set, no warm-up in epochs and a step interval for evaluation, an epoch's
  length is never used, and counting it would mean one pass over the whole training split (for
  lm1b / C4, all of it tokenized): steps per epoch is then 0 (unknown).
  """
  needs_epoch = train.num_steps <= 0 or train.warmup_epochs > 0 or not train.eval_every_steps
  steps_per_epoch = max(1, split_sizes["train"] // train.batch_size) if needs_epoch else 0
  if train.num_steps > 0:
    total = train.num_steps
  else:
    total = max(1, int(math.ceil(train.num_epochs * steps_per_epoch)))
  return steps_per_epoch, total


def make_schedule(train: TrainSettings, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Learning rate per step: linear warm-up from 0, then cosine to 0, step drops, or constant."""
  base_lr = train.learning_rate
  warmup = int(round(train.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  if train.schedule == "cosine":
    if warmup == 0:
      return optax.cosine_decay_schedule(base_lr, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup, max(total_steps, warmup + 1),
                                              end_value=0.0)
  if train.schedule == "step":
    boundaries = {int(round(frac * total_steps)) - warmup: train.step_factor
                  for frac in train.step_boundaries}
    main = optax.piecewise_constant_schedule(base_lr, boundaries)
  elif train.schedule == "constant":
    main = optax.constant_schedule(base_lr)
  else:
    raise ValueError(f"train.schedule must be 'cosine', 'step' or 'constant', got "
                     f"{train.schedule!r}")
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(0.0, base_lr, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def _kernel_mask(params):
  """Weight decay applies to matrices / conv kernels, not to biases or norm scales."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(train: TrainSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
  """optax SGD (momentum, optional Nesterov), Adam or AdamW, with weight decay, on ``schedule``."""
  wd = train.weight_decay
  parts = []
  if train.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train.grad_clip_norm))
  if train.optimizer == "sgd":
    if wd:
      parts.append(optax.add_decayed_weights(wd, mask=_kernel_mask))
    parts.append(optax.sgd(schedule, momentum=train.momentum or None, nesterov=train.nesterov))
  elif train.optimizer == "adam":  # L2 regularisation added to the gradient (coupled)
    if wd:
      parts.append(optax.add_decayed_weights(wd, mask=_kernel_mask))
    parts.append(optax.adam(schedule, b1=train.b1, b2=train.b2))
  elif train.optimizer == "adamw":  # decoupled weight decay
    parts.append(optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=wd,
                             mask=_kernel_mask))
  else:
    raise ValueError(f"train.optimizer must be 'sgd', 'adam' or 'adamw', got {train.optimizer!r}")
  return optax.chain(*parts)
