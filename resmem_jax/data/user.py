"""A user's own data (arrays, or an iterable of batches) as splits for the inference pass.

The model-level API (``resmem_jax.fit``) runs the engine's inference pass over these splits, so
every example is seen exactly once whatever the batch and device count: batches are padded to
one fixed size and carry the usual boolean ``mask``.

A split is either ``(inputs, labels)`` arrays (``labels`` ``[n]`` class ids, or ``[n, L]`` next
tokens with an optional ``mask``) or an iterable of batches, each a dict with ``"inputs"`` and
``"labels"`` (and optionally ``"mask"``) or an ``(inputs, labels)`` pair. An iterable is read once
per pass; a one-shot iterator (a generator) is read into a list first.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np


def _as_batch(item: Any, where: str) -> dict:
  if isinstance(item, dict):
    if "inputs" not in item or "labels" not in item:
      raise ValueError(f"{where}: a batch dict needs 'inputs' and 'labels' (and optionally "
                       f"'mask'), got keys {sorted(item)}")
    batch = {"inputs": np.asarray(item["inputs"]), "labels": np.asarray(item["labels"])}
    if "mask" in item:
      batch["mask"] = np.asarray(item["mask"], bool)
    return batch
  if isinstance(item, (tuple, list)) and len(item) == 2:
    return {"inputs": np.asarray(item[0]), "labels": np.asarray(item[1])}
  raise ValueError(f"{where}: expected (inputs, labels) or a dict with 'inputs' and 'labels', "
                   f"got {type(item).__name__}")


def _check(batch: dict, where: str, num_classes: int | None = None) -> dict:
  """Shapes and dtypes of one batch and, once the model's ``num_classes`` is known, its labels'
  range (checked before the int32 cast, so no id wraps around), or ValueError naming ``where``."""
  inputs, labels = batch["inputs"], batch["labels"]
  if inputs.dtype.kind in "cOUS":  # complex: a float cast would drop the imaginary part
    raise ValueError(f"{where}: inputs must be real numbers (or integer tokens), got dtype "
                     f"{inputs.dtype}")
  if labels.ndim < 1 or inputs.shape[:1] != labels.shape[:1]:
    raise ValueError(f"{where}: inputs {inputs.shape} and labels {labels.shape} must have the same "
                     "number of rows")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels must be integer class ids, got dtype {labels.dtype} "
                     "(whole-number floats too are refused: convert with labels.astype(np.int32))")
  mask = batch.get("mask")
  if mask is not None and mask.shape != labels.shape:
    raise ValueError(f"{where}: mask {mask.shape} must have the labels' shape {labels.shape}")
  real = labels if mask is None else labels[mask]  # masked-out positions may hold any id
  if num_classes is not None and real.size:
    low, high = int(real.min()), int(real.max())  # Python ints: no wrap-around in the check
    if low < 0 or high >= num_classes:
      raise ValueError(f"{where}: labels must be class ids in [0, {num_classes}) (the model "
                       f"returns {num_classes} logits), got range [{low}, {high}]; fix the labels "
                       "or the model's number of outputs")
  return batch


class UserSplits:
  """Named splits of a user's data with the two methods the inference pass needs."""

  def __init__(self, splits: dict[str, Any], num_classes: int | None = None):
    """``num_classes``: the model's logits, when known; labels are checked against it (fit
    learns it from the model and calls :meth:`set_num_classes` before a pass reads labels)."""
    self._splits = {}
    self.num_classes = num_classes
    for name, split in splits.items():
      if split is None:
        continue
      if isinstance(split, tuple) and len(split) == 2 and hasattr(split[0], "shape"):
        batch = _check(_as_batch(split, name), name, num_classes)
        if batch["labels"].shape[0] == 0:
          raise ValueError(f"{name}: the data has 0 examples (inputs shape "
                           f"{batch['inputs'].shape}); give at least one")
        self._splits[name] = [batch]  # one big batch, cut below
      elif iter(split) is split:  # a one-shot iterator: kept, so that it can be read twice
        self._splits[name] = list(split)
      else:
        self._splits[name] = split

  def set_num_classes(self, num_classes: int) -> None:
    """Checks every label from now on against the model's ``num_classes`` logits: array splits
    at once, batches of an iterable as they are read."""
    self.num_classes = int(num_classes)
    for name, split in self._splits.items():
      if self.num_examples(name) is not None:
        _check(split[0], name, self.num_classes)

  def __contains__(self, split: str) -> bool:
    return split in self._splits

  def num_examples(self, split: str) -> int | None:
    """Rows of an array split; None for an iterable (unknown until read)."""
    split_data = self._splits[split]
    if isinstance(split_data, list) and len(split_data) == 1 and isinstance(split_data[0], dict):
      return int(split_data[0]["labels"].shape[0])
    return None

  def example_shape(self, split: str) -> tuple[tuple[int, ...], int] | None:
    """``(one example's input shape, bytes per input element)`` of an array split, else None."""
    if self.num_examples(split) is None:
      return None
    inputs = self._splits[split][0]["inputs"]
    return tuple(inputs.shape[1:]), int(inputs.dtype.itemsize)

  def eval_batches(self, split: str, global_batch_size: int) -> Iterator[dict]:
    """Batches of exactly ``global_batch_size`` examples, the last padded (``mask`` False)."""
    return _padded(self._batches(split), global_batch_size, split)

  def _batches(self, split: str) -> Iterable[dict]:
    for i, item in enumerate(self._splits[split]):
      where = split if self.num_examples(split) is not None else f"{split} batch {i}"
      yield _check(_as_batch(item, where), where, self.num_classes)


def _padded(batches: Iterable[dict], size: int, split: str) -> Iterator[dict]:
  """Re-cuts batches of any size into batches of ``size`` rows, padding the last one."""
  pending: list[dict] = []
  held = 0
  seen = rows = 0
  for batch in batches:
    mask = batch.get("mask")
    if mask is None:
      mask = np.ones(batch["labels"].shape, bool)
    pending.append({"inputs": batch["inputs"], "labels": batch["labels"].astype(np.int32),
                    "mask": mask})
    held += batch["labels"].shape[0]
    rows += batch["labels"].shape[0]
    seen += 1
    while held >= size:
      merged = {k: np.concatenate([p[k] for p in pending]) for k in ("inputs", "labels", "mask")}
      yield {k: v[:size] for k, v in merged.items()}
      rest = {k: v[size:] for k, v in merged.items()}
      pending, held = ([rest] if rest["labels"].shape[0] else []), rest["labels"].shape[0]
  if seen == 0:
    raise ValueError(f"the {split} data holds no batches")
  if rows == 0:
    raise ValueError(f"the {split} data has 0 examples (its batches hold no rows); give at "
                     "least one")
  if held:
    merged = {k: np.concatenate([p[k] for p in pending]) for k in ("inputs", "labels", "mask")}
    pad = size - held
    yield {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
           for k, v in merged.items()}
