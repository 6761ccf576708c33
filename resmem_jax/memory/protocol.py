"""What a memory offers its callers, whichever kind it is.

Two classes implement it: :class:`~resmem_jax.memory.Memory` (one process's keys, residual store
and search index) and :class:`~resmem_jax.memory.hosts.HostShardedMemory` (rows split across
processes, every read a collective). Prediction, selection, evaluation and the workdir's save and
reuse need only this much, so they take either; building and editing (``add``, ``keys``,
``index``) belong to :class:`~resmem_jax.memory.Memory` alone.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ResidualMemory(Protocol):
  """Keys mapped to residual rows, searched by Euclidean distance (see ``Memory.search``)."""

  @property
  def size(self) -> int:
    """Rows (keys) in the memory."""

  @property
  def dim(self) -> int:
    """Dimension of a key."""

  @property
  def num_outputs(self) -> int:
    """Columns of a dense residual row (classes, or the vocabulary)."""

  @property
  def residual_format(self) -> str:
    """How residual rows are stored: ``dense``, ``bfloat16`` or ``sparse``."""

  @property
  def backend(self) -> str:
    """The search backend's registry name (``memory/index.py``)."""

  @property
  def backend_options(self) -> dict:
    """The index's options, JSON-ready (tuned query settings included)."""

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(distances [q, k] float32 ascending, ids [q, k] int32)`` of the k nearest keys."""

  def residual_rows(self, ids) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored rows of ``ids``: ``(values, columns)``, columns None unless sparse."""

  def gather_residuals(self, ids) -> np.ndarray:
    """Dense float32 residuals ``[..., C]`` of rows ``ids``."""

  def labels_of(self, ids) -> np.ndarray:
    """What rows ``ids`` memorize (int32), for memories built with labels."""

  def with_store(self, store, metadata=None) -> ResidualMemory:
    """The same keys and index over another residual store."""

  def tune_search(self, queries, k: int, target_recall: float = 0.99, **grids) -> dict:
    """The fastest query settings reaching ``target_recall`` on ``queries``; kept by the index."""

  def save(self, path) -> None:
    """Writes the memory to folder ``path``."""
