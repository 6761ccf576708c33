"""One inference pass over a split: logits, embeddings and labels for every example exactly once.

Batches come from ``resmem_jax.data.eval_batches`` already padded to a fixed global batch size,
with a boolean ``mask`` marking the real examples. The forward pass is jitted over the data mesh
(batch split across devices, variables replicated); padded rows are dropped on the host by the mask,
so no example is lost or duplicated whatever the split size, batch size or device count.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from resmem_jax import mesh as mesh_lib


@dataclasses.dataclass
class SplitOutputs:
  """Host arrays for one split, row i of each belonging to the same example."""
  logits: np.ndarray      # [n, C] float32
  embeddings: np.ndarray  # [n, D] float32
  labels: np.ndarray      # [n] int32
  seconds: float = 0.0    # wall time of the pass (after compilation)

  @property
  def size(self) -> int:
    return int(self.labels.shape[0])


def make_forward(module, mesh: Mesh) -> Callable:
  """Jitted ``(variables, batch) -> (logits, embedding)`` with the batch sharded over ``mesh``."""
  batch_sharding = mesh_lib.batch_sharded(mesh)

  @jax.jit
  def forward(variables, inputs):
    logits, embedding = module.apply(variables, inputs, train=False)
    # Constrain outputs to the batch sharding so each device keeps its rows (no all-gather).
    logits = jax.lax.with_sharding_constraint(logits.astype(np.float32), batch_sharding)
    embedding = jax.lax.with_sharding_constraint(embedding.astype(np.float32), batch_sharding)
    return logits, embedding

  return forward


def _progress(iterable: Iterable, total: int | None, desc: str, enabled: bool) -> Iterable:
  if not enabled or not sys.stderr.isatty():
    return iterable
  from tqdm import tqdm
  return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def run_forward(forward: Callable, variables: Any, batches: Iterator[dict], mesh: Mesh, *,
                input_key: str = "image", total_batches: int | None = None, desc: str = "embed",
                progress: bool = True) -> SplitOutputs:
  """Applies ``forward`` to every batch and returns the unpadded outputs, in iteration order.

  One batch stays in flight while the previous one is copied to the host, so the device does not
  wait for the transfer.
  """
  logits_parts, emb_parts, label_parts = [], [], []
  pending = None

  def collect(item):
    (logits, emb), labels, mask = item
    logits, emb = mesh_lib.to_host((logits, emb))
    if jax.process_count() > 1:
      labels, mask = mesh_lib.to_host((mesh_lib.shard_batch(labels, mesh),
                                       mesh_lib.shard_batch(mask, mesh)))
    mask = np.asarray(mask, bool)
    logits_parts.append(logits[mask])
    emb_parts.append(emb[mask])
    label_parts.append(np.asarray(labels)[mask])

  start = time.perf_counter()
  for batch in _progress(batches, total_batches, desc, progress):
    if "mask" not in batch:
      raise ValueError(f"inference batches need a 'mask' entry (got keys {sorted(batch)})")
    inputs = mesh_lib.shard_batch(batch[input_key], mesh)
    outputs = forward(variables, inputs)
    if pending is not None:
      collect(pending)
    pending = (outputs, batch["label"], batch["mask"])
  if pending is not None:
    collect(pending)
  seconds = time.perf_counter() - start
  if not logits_parts:
    raise ValueError(f"split '{desc}' produced no batches")
  return SplitOutputs(
      logits=np.concatenate(logits_parts).astype(np.float32),
      embeddings=np.concatenate(emb_parts).astype(np.float32),
      labels=np.concatenate(label_parts).astype(np.int32),
      seconds=seconds)


def embed_split(module, variables, data_cfg, split: str, batch_size: int, mesh: Mesh | None = None,
                *, input_key: str = "image", progress: bool = True, forward: Callable | None = None
                ) -> SplitOutputs:
  """Logits, embeddings and labels of every example of ``split`` (``train``/``validation``/``test``).

  ``batch_size`` is the global batch; it is rounded up to a multiple of the device count.
  """
  from resmem_jax import data as data_lib
  mesh = mesh or mesh_lib.data_mesh()
  batch_size = mesh_lib.pad_to_multiple(int(batch_size), mesh_lib.num_data_shards(mesh))
  variables = mesh_lib.replicate(variables, mesh)
  forward = forward or make_forward(module, mesh)
  n = data_lib.num_examples(data_cfg, split)
  total = -(-n // batch_size)
  out = run_forward(forward, variables, data_lib.eval_batches(data_cfg, split, batch_size), mesh,
                    input_key=input_key, total_batches=total, desc=split, progress=progress)
  if out.size != n:
    raise RuntimeError(f"embedding pass over '{split}' returned {out.size} examples, expected {n}")
  return out
