"""Index arithmetic behind every split and batch: pure NumPy, no I/O, no global state.

* Validation is carved from the training split by a fixed permutation (legacy ``RandomState``,
  whose streams NumPy keeps stable across versions), so it never depends on the training seed.
* ``train_fraction`` keeps a prefix of a second fixed permutation of what remains, so a smaller
  fraction is always a subset of a larger one (the paper's sample-size experiment).
* The training stream is the concatenation of per-epoch permutations drawn from ``(seed, epoch)``;
  the global batch at ``step`` covers stream positions ``[step * B, (step + 1) * B)``, so any step
  can be reached in O(1) without replaying earlier batches. :class:`TrainOrder` keeps the
  permutation of the epoch it last used, so consecutive batches do not redraw it.
* Every process takes the same contiguous slice of every global batch.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

# Distinct first words of the seed sequences so the shuffling and augmentation streams never
# coincide for the same (seed, counter).
PERMUTATION_STREAM = 0
AUGMENTATION_STREAM = 1


def carve_validation(num_train: int, val_fraction: float,
                     split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Splits ``range(num_train)`` into sorted (train, validation) index arrays, disjoint."""
  if not 0.0 <= float(val_fraction) < 1.0:
    raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
  num_val = int(round(float(val_fraction) * num_train))
  order = np.random.RandomState(split_seed).permutation(num_train)
  return np.sort(order[num_val:]), np.sort(order[:num_val])


def subsample(indices: np.ndarray, fraction: float, split_seed: int = 0) -> np.ndarray:
  """A deterministic ``fraction`` of ``indices`` (at least one), nested across fractions."""
  if not 0.0 < float(fraction) <= 1.0:
    raise ValueError(f"data.train_fraction must be in (0, 1], got {fraction!r}")
  indices = np.asarray(indices)
  if fraction == 1.0 or len(indices) == 0:
    return indices
  keep = max(1, int(round(float(fraction) * len(indices))))
  # A different stream than carve_validation so the two choices are independent.
  order = np.random.RandomState(split_seed + 1).permutation(len(indices))
  return np.sort(indices[order[:keep]])


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """The part of every global batch that ``process_index`` feeds."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                     f"process count {process_count}")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the training set in ``epoch``."""
  rng = np.random.default_rng([PERMUTATION_STREAM, int(seed), int(epoch)])
  return rng.permutation(num_examples)


class TrainOrder:
  """Positions (into the training set) of the global batch at any step, for one ``seed``."""

  def __init__(self, num_examples: int, global_batch_size: int, seed: int):
    if num_examples < 1:
      raise ValueError("the training split is empty; check data.val_fraction / "
                       "data.train_fraction")
    self.num_examples = num_examples
    self.global_batch_size = global_batch_size
    self.seed = seed
    # The permutation of the epoch used last: consecutive batches share it.
    self._epoch = -1
    self._order = np.empty(0, np.int64)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._epoch, self._order = epoch, epoch_permutation(self.num_examples, self.seed, epoch)
    return self._order

  def batch(self, step: int) -> np.ndarray:
    """Positions of the global batch at ``step``, int64 [B]."""
    positions = step * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, self.num_examples)
    out = np.empty(self.global_batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      out[where] = self._permutation(int(epoch))[offsets[where]]
    return out


def augmentation_rng(seed: int, step: int) -> np.random.Generator:
  """Randomness for the augmentation of the whole global batch at ``step``."""
  return np.random.default_rng([AUGMENTATION_STREAM, int(seed), int(step)])


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  return -(-num_examples // global_batch_size)


def eval_batch_indices(num_examples: int, global_batch_size: int, process_index: int,
                       process_count: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(indices, mask) per batch for this process; padded rows point at index 0 with mask False.

  Across all processes and batches every index in ``range(num_examples)`` has mask True exactly
  once, and every process yields the same number of equally sized batches.
  """
  part = process_slice(global_batch_size, process_index, process_count)
  for batch in range(num_eval_batches(num_examples, global_batch_size)):
    positions = batch * global_batch_size + np.arange(global_batch_size, dtype=np.int64)[part]
    mask = positions < num_examples
    yield np.where(mask, positions, 0), mask
