"""A memory built from rows on disk: shards written as an inference pass goes, read back in order.

    shards.write_shard(folder, 0, keys, {"sparse_columns": c, "sparse_values": v}, labels)
    ...
    memory = shards.build_memory_from_shards(folder, num_outputs=65, backend="scann",
                                             key_format="int8", residual_format="sparse_float16")

A shard is one ``.npz`` file (``shard-00000.npz``): float32 keys ``[m, d]``, the residual rows in
the store's arrays (per temperature: ``t0/sparse_columns``, ``t0/sparse_values``, ... for a pass
that computes several), and optional labels. It is written beside its final name and renamed into
place, so a shard is there whole or not at all: a build killed part way resumes after the last
complete shard (:func:`completed`). ``spec.json`` records what the rows were made from (the
caller's dict: model digest, temperatures, formats); a folder whose spec differs is not reused.

The build reads the shards twice, one at a time: once for the row count and the sample the
compact key formats learn their centroids from, once to code the keys and fill the residual
stores. Its peak memory is the finished memory (coded keys, residual stores, the index) plus one
shard's float32 rows and the index's working set (ScaNN: one sample of ``training_sample_size``
keys and one ``ROWS_PER_UPSERT`` slice, :mod:`resmem_jax.memory.scann`); float32 keys of all rows
are never in RAM together.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from resmem_jax.memory import keys as keys_lib
from resmem_jax.memory import store as store_lib

SPEC = "spec.json"
_SHARD = re.compile(r"shard-(\d{5})\.npz")


def shard_path(folder, index: int) -> str:
  return os.path.join(os.fspath(folder), f"shard-{index:05d}.npz")


def write_shard(folder, index: int, keys: np.ndarray, residual_arrays: dict,
                labels: np.ndarray | None = None) -> str:
  """Writes shard ``index`` whole (beside its name, fsynced, then renamed); returns its path.

  ``residual_arrays``: a store's arrays (``{"residuals": ...}`` or ``{"sparse_columns",
  "sparse_values"}``), or ``{temperature name: such a dict}`` for several temperatures.
  """
  path = shard_path(folder, index)
  arrays = {"keys": np.asarray(keys, np.float32)}
  for name, value in residual_arrays.items():
    if isinstance(value, dict):
      arrays.update({f"{name}/{inner}": np.asarray(a) for inner, a in value.items()})
    else:
      arrays[name] = np.asarray(value)
  if labels is not None:
    arrays["labels"] = np.asarray(labels, np.int32)
  rows = {a.shape[0] for a in arrays.values()}
  if len(rows) != 1:
    raise ValueError(f"shard {index}: arrays have different row counts {sorted(rows)}")
  os.makedirs(os.fspath(folder), exist_ok=True)
  partial = path + ".partial"
  with open(partial, "wb") as f:
    np.savez(f, **arrays)  # type: ignore[arg-type]  # names, not the allow_pickle flag
    f.flush()
    os.fsync(f.fileno())
  os.replace(partial, path)
  return path


def completed(folder) -> list[int]:
  """The complete shards of ``folder`` that form an unbroken run from 0 (a resume continues after
  the last of them; a shard beyond a gap is not trusted)."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    return []
  present = {int(m.group(1)) for name in os.listdir(folder) if (m := _SHARD.fullmatch(name))}
  run: list[int] = []
  while len(run) in present:
    run.append(len(run))
  return run


def prepare(folder, spec: dict) -> list[int]:
  """Makes ``folder`` ready for shards made as ``spec`` (a JSON-ready dict) says; returns the
  complete shards to resume after. A folder of shards made otherwise (another model, other
  temperatures or formats) has its shards removed: they are this library's derived files, and
  only files named as shards are touched."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  spec = json.loads(json.dumps(spec))
  spec_path = os.path.join(folder, SPEC)
  if os.path.isfile(spec_path):
    with open(spec_path) as f:
      try:
        same = json.load(f) == spec
      except ValueError:
        same = False
    if same:
      return completed(folder)
  for name in os.listdir(folder):
    if _SHARD.fullmatch(name) or name.endswith(".npz.partial"):
      os.remove(os.path.join(folder, name))
  partial = spec_path + ".partial"
  with open(partial, "w") as f:
    json.dump(spec, f, indent=1, sort_keys=True)
  os.replace(partial, spec_path)
  return []


def _read(folder, index: int) -> dict:
  with np.load(shard_path(folder, index), allow_pickle=False) as data:
    return {name: data[name] for name in data.files}


def _residual_arrays(arrays: dict, prefix: str | None) -> dict:
  if prefix is None:
    return {name: arrays[name] for name in arrays if name not in ("keys", "labels")
            and "/" not in name}
  return {name.split("/", 1)[1]: a for name, a in arrays.items() if name.startswith(prefix + "/")}


def read_stores(folder, *, num_outputs: int, key_format: str = "float32",
                residual_format: str = "dense", top_m: int | None = None,
                temperatures: list[str] | None = None, count: int | None = None):
  """``(KeyStore, {temperature name or None: residual store}, labels or None)`` of the first
  ``count`` (default: all complete) shards, read one at a time."""
  indices = completed(folder) if count is None else list(range(count))
  if not indices:
    raise ValueError(f"{folder} holds no complete shard of memory rows; run the inference pass "
                     "that writes them first")
  sizes, dim = [], 0
  centroid_sample = []
  rng = np.random.default_rng(0)
  for index in indices:  # pass 1: row counts, and the compact formats' centroid sample
    with np.load(shard_path(folder, index), allow_pickle=False) as data:
      rows = data["keys"]
      sizes.append(rows.shape[0])
      dim = rows.shape[1]
      if key_format != "float32":
        per_shard = -(-keys_lib.CODEBOOK_SAMPLE // len(indices))
        pick = rng.choice(rows.shape[0], min(per_shard, rows.shape[0]), replace=False)
        centroid_sample.append(rows[np.sort(pick)])
  total = int(sum(sizes))
  centroids = (keys_lib.learn_codebook(np.concatenate(centroid_sample))
               if key_format != "float32" else None)
  key_store = keys_lib.KeyStore.empty(key_format, int(dim), centroids)
  key_store.codes = np.empty((total, dim), key_store.codes.dtype)
  if key_store.scales is not None:
    key_store.scales = np.empty(total, np.float32)
  if key_store.centroid_ids is not None:
    key_store.centroid_ids = np.empty(total, np.uint16)
  names = [None] if temperatures is None else list(temperatures)
  # The finished arrays, allocated at their final size and types (no concatenation copies).
  joined: dict = {name: {} for name in names}
  labels = None
  start = 0
  for index, size in zip(indices, sizes, strict=True):  # pass 2: code the keys, fill the residual rows
    arrays = _read(folder, index)
    codes, scales, ids = keys_lib.encode(arrays["keys"], key_store)
    key_store.codes[start:start + size] = codes
    if scales is not None and key_store.scales is not None:
      key_store.scales[start:start + size] = scales
    if ids is not None and key_store.centroid_ids is not None:
      key_store.centroid_ids[start:start + size] = ids
    for name in names:
      for key, part in _residual_arrays(arrays, name).items():
        if key not in joined[name]:
          joined[name][key] = np.empty((total,) + part.shape[1:],
                                       _stored_dtype(key, part.dtype, residual_format, num_outputs))
        joined[name][key][start:start + size] = part
    if "labels" in arrays:
      if labels is None:
        labels = np.empty(total, np.int32)
      labels[start:start + size] = arrays["labels"]
    start += size
  stores = {name: store_lib.store_from_arrays(joined.pop(name), residual_format, num_outputs, top_m)
            for name in names}
  return key_store, stores, labels


def _stored_dtype(name: str, dtype, residual_format: str, num_outputs: int):
  """The dtype the store keeps array ``name`` in (so that filling it is the only copy)."""
  if name == "sparse_columns":
    return np.uint16 if num_outputs <= 65536 else np.int32
  if name == "sparse_values" and residual_format == "sparse_float16":
    return np.float16
  return dtype


def build_memory_from_shards(folder, *, num_outputs: int, backend: str = "scann",
                             key_format: str = "float32", residual_format: str = "dense",
                             top_m: int | None = None, metadata=None, **backend_options):
  """A :class:`~resmem_jax.memory.Memory` over every complete shard of ``folder`` (rows in shard
  order), built without all float32 keys in RAM at once (see the module docstring)."""
  from resmem_jax import memory as memory_lib  # pylint: disable=g-import-not-at-top
  if residual_format in store_lib.SPARSE_FORMATS and top_m is None:
    top_m = memory_lib.DEFAULT_TOP_M
  key_store, stores, labels = read_stores(folder, num_outputs=num_outputs, key_format=key_format,
                                          residual_format=residual_format, top_m=top_m)
  return memory_lib.memory_from_store(key_store, stores[None], backend, labels=labels,
                                      metadata=metadata, key_format=key_format, **backend_options)
