"""The one interface every data set implements, and the argument checks all of them share.

A :class:`Dataset` is created cheaply from :class:`resmem_jax.settings.DataSettings`; it reads,
prepares or loads its data on first use and keeps it on the instance (the engine creates one per
run and passes it around), so nothing is cached at module level. The public methods check their
arguments at once, before any data is read, and hand over to the ``_train_batches`` /
``_eval_batches`` generators of the subclass.

Batches are dicts of NumPy arrays with the same keys for every data set:

* ``train_batches``: endless, this process's slice of every global batch, ``{"inputs",
  "labels"}`` (text adds ``"mask"``), a pure function of ``(seed, start_step)``: a resumed run
  sees exactly the batches an uninterrupted run would have seen.
* ``eval_batches``: every example of the split exactly once, in order, the last batch padded:
  ``{"inputs", "labels", "mask"}``; ``mask`` is bool with the shape of ``labels`` (False on
  padding, where inputs and labels are zeros). Every process yields the same number of equally
  sized batches, so the caller can assemble global arrays.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Iterator, Mapping, Protocol, runtime_checkable

import numpy as np

from resmem_jax.data import splits
from resmem_jax.settings import DataSettings

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int  # classes, or the vocabulary size for text
  input_shape: tuple[int, ...]  # one example's inputs: (H, W, C) images, (seq_len,) text
  input_dtype: str  # "float32" (images) or "int32" (tokens)
  split_sizes: Mapping[str, int]  # examples (sequences) per split


@runtime_checkable
class DataSource(Protocol):
  """What an inference pass reads: a registry's :class:`Dataset` or a user's splits
  (:class:`resmem_jax.data.user.UserSplits`)."""

  def num_examples(self, split: str) -> int | None:
    """Examples (sequences) of ``split``; None when unknown until read (a user's iterable)."""

  def eval_batches(self, split: str, global_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example of ``split`` once, in order, ``{"inputs", "labels", "mask"}``, batches of
    ``global_batch_size`` rows, the last padded (``mask`` False)."""


class Dataset(abc.ABC):
  """A data set behind the common batch interface; see the module docstring."""

  def __init__(self, settings: DataSettings):
    self.settings = settings

  @property
  @abc.abstractmethod
  def info(self) -> DatasetInfo:
    """Name, class count, input shape / dtype and split sizes (loads the data on first use)."""

  def num_examples(self, split: str) -> int:
    check_split(split)
    return self.info.split_sizes[split]

  def train_batches(self, global_batch_size: int, seed: int, start_step: int = 0, *,
                    process_index: int | None = None,
                    process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches (this process's slice), deterministic in ``(seed, start_step)``.

    ``process_index`` / ``process_count`` default to JAX's; tests pass them to simulate hosts.
    """
    global_batch_size = check_batch_size(global_batch_size)
    if isinstance(start_step, bool) or int(start_step) != start_step or start_step < 0:
      raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}")
    process_index, process_count = processes(process_index, process_count)
    part = splits.process_slice(global_batch_size, process_index, process_count)
    return self._train_batches(global_batch_size, int(seed), int(start_step), part,
                               process_index, process_count)

  def eval_batches(self, split: str, global_batch_size: int, *,
                   process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every example of ``split`` once, in order; the last batch padded and masked."""
    check_split(split)
    global_batch_size = check_batch_size(global_batch_size)
    process_index, process_count = processes(process_index, process_count)
    part = splits.process_slice(global_batch_size, process_index, process_count)
    return self._eval_batches(split, global_batch_size, part, process_index, process_count)

  @abc.abstractmethod
  def _train_batches(self, global_batch_size: int, seed: int, start_step: int, part: slice,
                     process_index: int, process_count: int) -> Iterator[dict[str, np.ndarray]]:
    """The generator behind :meth:`train_batches`; ``part`` is this process's rows."""

  @abc.abstractmethod
  def _eval_batches(self, split: str, global_batch_size: int, part: slice, process_index: int,
                    process_count: int) -> Iterator[dict[str, np.ndarray]]:
    """The generator behind :meth:`eval_batches`; ``part`` is this process's rows."""


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be one of {SPLITS}")


def check_batch_size(global_batch_size) -> int:
  if isinstance(global_batch_size, bool) or int(global_batch_size) != global_batch_size \
      or global_batch_size < 1:
    raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
  return int(global_batch_size)


def processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """``(process_index, process_count)``, JAX's where not given."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)
