"""One inference pass over a split: a row per example (images) or per token (text), each once.

Eval batches come padded to a fixed global size with a boolean ``mask`` of the labels' shape
(``[b]`` per example, ``[b, L]`` per token). The forward pass is jitted over the data mesh (batch
split across devices, variables replicated); outputs are cut into rows by the mask on the host, so
no row is lost or duplicated whatever the split size, batch size or device count. That mask is the
only difference between the image and the token job.

Besides embeddings (the memory keys and queries), a pass can return the logits and the residual
rows ``onehot(y) - softmax(z / T)`` at several temperatures, computed on the device and already in
the memory's storage format (dense float32, bfloat16, or the sparse top-m columns and values), so
a vocabulary-sized residual row never reaches the host.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from resmem_jax import mesh as mesh_lib
from resmem_jax.core import residuals as residuals_lib

# apply_fn(variables, inputs) -> (logits [..., C], embedding [..., D]) with the inputs' leading dims.
ApplyFn = Callable[[Any, jax.Array], tuple]


@dataclasses.dataclass
class Rows:
  """Host arrays for consecutive rows of a split; row i of each belongs to the same example/token."""
  embeddings: np.ndarray                 # [n, D] float32
  labels: np.ndarray                     # [n] int32
  logits: np.ndarray | None = None       # [n, C] float32, when asked for
  # temperature -> the residual rows at that T in the store's arrays
  # ({"residuals": [n, C]} dense / bfloat16, or {"sparse_columns", "sparse_values"} [n, m + 1]).
  residuals: dict = dataclasses.field(default_factory=dict)
  seconds: float = 0.0                   # time the pass spent producing these rows

  @property
  def size(self) -> int:
    return int(self.labels.shape[0])


def residual_arrays(labels, logits, temperature: float, residual_format: str, top_m: int) -> dict:
  """The store arrays of ``onehot(labels) - softmax(logits / T)`` in ``residual_format`` (jittable)."""
  r = residuals_lib.classification_residuals(labels, logits, temperature)
  if residual_format in ("sparse", "sparse_float16"):  # float32 values: the store converts
    columns, values = residuals_lib.sparse_top_m(r, top_m, labels)
    return {"sparse_columns": columns, "sparse_values": values}
  if residual_format == "bfloat16":
    return {"residuals": r.astype(jnp.bfloat16)}
  return {"residuals": r}


@dataclasses.dataclass(frozen=True)
class Forward:
  """A jitted forward pass and the temperatures of the residual rows it returns."""
  fn: Callable
  temperatures: tuple[float, ...]

  def __call__(self, variables, inputs, labels):
    return self.fn(variables, inputs, labels)


def make_forward(apply_fn: ApplyFn, mesh: Mesh, *, with_logits: bool = True,
                 temperatures: Sequence[float] = (), residual_format: str = "dense",
                 top_m: int = 16, compiler_options: dict | None = None) -> Forward:
  """Jitted ``(variables, inputs, labels) -> dict`` of batch-sharded outputs.

  Keys: ``embeddings``, ``logits`` (when ``with_logits``) and ``residuals`` (one dict of store
  arrays per temperature, in the order given). ``compiler_options`` go to ``jax.jit``
  (``resmem_jax/compiler_options.py``).
  """
  temperatures = tuple(float(t) for t in temperatures)
  batch_sharding = mesh_lib.batch_sharded(mesh)

  @functools.partial(jax.jit, compiler_options=compiler_options)
  def forward(variables, inputs, labels):
    logits, embeddings = apply_fn(variables, inputs)
    logits = logits.astype(jnp.float32)
    out = {"embeddings": embeddings.astype(jnp.float32),
           "residuals": [residual_arrays(labels, logits, t, residual_format, top_m)
                         for t in temperatures]}
    if with_logits:
      out["logits"] = logits
    # Each device keeps its rows (no all-gather inside the program).
    return jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), out)

  return Forward(forward, temperatures)


def _progress(iterable: Iterable, total: int | None, desc: str, enabled: bool) -> Iterable:
  if not enabled or not sys.stderr.isatty() or jax.process_index() != 0:
    return iterable
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def _rows(outputs: dict, labels: np.ndarray, mask: np.ndarray, temperatures, seconds) -> Rows:
  """The masked rows of one batch: leading dims (those of the mask) flattened."""
  keep = mask.reshape(-1)
  lead = mask.ndim

  def cut(x):
    x = np.asarray(x)
    return x.reshape((-1,) + x.shape[lead:])[keep]

  return Rows(
      embeddings=cut(outputs["embeddings"]).astype(np.float32, copy=False),
      labels=cut(labels).astype(np.int32),
      logits=cut(outputs["logits"]) if "logits" in outputs else None,
      residuals={t: {name: cut(a) for name, a in arrays.items()}
                 for t, arrays in zip(temperatures, outputs["residuals"], strict=True)},
      seconds=seconds)


def _local_rows(tree: Any) -> Any:
  """This process's rows of batch-sharded global arrays (its devices' shards, in order)."""
  def local(x):
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])
  return jax.tree_util.tree_map(local, tree)


def run_pass(forward: Forward, variables: Any, batches: Iterable[dict], mesh: Mesh, *,
             desc: str = "inference", total_batches: int | None = None,
             progress: bool = True, local: bool = False) -> Iterator[Rows]:
  """Applies ``forward`` to every batch; yields the real (mask True) rows of each, in order.

  Every process gets every row of the global batches, unless ``local``: then each process gets
  only the rows of its own batches (a host-sharded memory's build: no host holds them all).

  One batch stays in flight while the previous one is copied to the host, so the device does not
  wait for the transfer. ``Rows.seconds`` is the time the pass spent since it last yielded
  (reading, forward, transfer): the consumer's own work between batches is not counted.
  """
  fetch = _local_rows if local and jax.process_count() > 1 else mesh_lib.to_host
  pending = None
  clock = time.perf_counter()
  for batch in _progress(batches, total_batches, desc, progress):
    if "mask" not in batch:
      raise ValueError(f"inference batches need a 'mask' entry (got keys {sorted(batch)})")
    labels, mask = np.asarray(batch["labels"]), np.asarray(batch["mask"], bool)
    if mask.shape != labels.shape:
      raise ValueError(f"batch mask has shape {mask.shape} but labels have {labels.shape}")
    inputs, device_labels = mesh_lib.shard_batch((batch["inputs"], labels), mesh)
    outputs = forward(variables, inputs, device_labels)
    if jax.process_count() > 1 and not local:  # every process gets every row of the batch
      labels, mask = mesh_lib.to_host((device_labels, mesh_lib.shard_batch(mask, mesh)))
    if pending is not None:
      rows = _rows(fetch(pending[0]), *pending[1:], forward.temperatures,
                   time.perf_counter() - clock)
      yield rows
      clock = time.perf_counter()
    pending = (outputs, labels, np.asarray(mask, bool))
  if pending is not None:
    yield _rows(fetch(pending[0]), *pending[1:], forward.temperatures,
                time.perf_counter() - clock)


def concatenate(parts: Sequence[Rows]) -> Rows:
  """One :class:`Rows` from consecutive parts (same fields present in each)."""
  if not parts:
    raise ValueError("no rows to concatenate")
  first = parts[0]
  cat = lambda xs: np.concatenate(xs) if len(xs) > 1 else xs[0]
  return Rows(
      embeddings=cat([p.embeddings for p in parts]),
      labels=cat([p.labels for p in parts]),
      logits=None if first.logits is None else cat([p.logits for p in parts]),
      residuals={t: {name: cat([p.residuals[t][name] for p in parts]) for name in arrays}
                 for t, arrays in first.residuals.items()},
      seconds=sum(p.seconds for p in parts))


def rechunk(parts: Iterable[Rows], rows: int, limit: int | None = None) -> Iterator[Rows]:
  """Regroups a stream of Rows into chunks of ``rows`` rows (the last may be shorter), stopping
  after ``limit`` rows in total when given."""
  buffer, held, seen = [], 0, 0
  for part in parts:
    if limit is not None and seen + part.size > limit:
      part = take(part, limit - seen)
    buffer.append(part)
    held += part.size
    seen += part.size
    while held >= rows:
      merged = concatenate(buffer)
      yield take(merged, rows)
      rest = take(merged, held - rows, start=rows)
      buffer, held = ([rest] if rest.size else []), rest.size
    if limit is not None and seen >= limit:
      break
  if held:
    yield concatenate(buffer)


def take(rows: Rows, count: int, start: int = 0) -> Rows:
  """Rows ``[start, start + count)``."""
  s = slice(start, start + count)
  return Rows(rows.embeddings[s], rows.labels[s], None if rows.logits is None else rows.logits[s],
              {t: {n: a[s] for n, a in arrays.items()} for t, arrays in rows.residuals.items()},
              rows.seconds if start == 0 else 0.0)
