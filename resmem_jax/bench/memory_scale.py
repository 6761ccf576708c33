"""Memory search at scale, built from shards on disk: experiments/bench_memory.py --build_from=shards.

Data (never all float32 rows in RAM at once): ``n`` rows of dimension ``d`` around
``num_clusters`` unit-normal centres (drawn once from ``seed``), each row ``centre + spread * N(0,
I)`` with its centre picked uniformly, written shard by shard with
:func:`resmem_jax.memory.shards.write_shard` (keys, synthetic sparse residual rows of
``num_classes`` classes, an int32 label per row). Queries are independent draws from the same
mixture. The reference top-k is exact brute force over the shards on disk (faiss ``IndexFlatL2``
per shard, its candidates re-scored in float64, merged), cached beside the shards.

Each method runs in its own Python process (``python -m resmem_jax.bench.memory_scale``), so its
peak RSS (``getrusage``'s ``ru_maxrss``) is its build, save and search alone (plus that process's
imports: ``rss0``). Per row: build seconds, peak RSS, bytes per row in RAM (RSS after the build
minus RSS before, over n, after ``malloc_trim``; a ScaNN memory is saved before it is searched,
as the job does, and measured after that save) and on disk (the saved memory folder / faiss
``write_index`` file, plus the float16 keys file for the re-ranking peer), queries per second
(all queries in one batched call, the fastest of ``repeats`` after a warm-up call) and recall@k.

  scann <key format>   a ResMem memory (:func:`~resmem_jax.memory.shards.build_memory_from_shards`,
                       ScaNN backend, ``residual_format`` residuals, labels) for each key format,
                       over a sweep of ``leaves_to_search`` x ``reorder``.
  faiss IVFPQ          ``IndexIVFPQ`` with ``pq_bytes``-byte codes (kNN-LM's 64), ``nlist`` lists,
                       trained on a random sample; an nprobe sweep.
  faiss IVFPQ+rerank   the same index, its top ``depth`` candidates re-scored exactly from float16
                       keys held in RAM (kNN-LM's re-rank; 2 d bytes per row more).
  faiss HNSWFlat       ``IndexHNSWFlat(d, M)``, built in chunks within a time budget: when the
                       next chunk would overrun it, the index stays on the prefix built so far
                       and its row says so (recall then against the exact top-k of that prefix).
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

QUERY_SEED_OFFSET = 1_000_003  # the queries' generator: independent of every shard's
ROWS_PER_DRAW = 100_000  # rows drawn (and residual rows made) per step: bounded temporaries
RESIDUAL_TOP_M = 16


# -- process measurements ---------------------------------------------------------------------
def _trim():
  """Returns freed heap to the OS, so RSS counts what is held, not what malloc kept."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass


def rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def peak_rss_bytes() -> int:
  """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _faiss_file_bytes(faiss, index, scratch: str, name: str) -> int:
  """Bytes of ``index`` as faiss writes it to disk (written to ``scratch``, measured, removed)."""
  path = os.path.join(scratch, name)
  faiss.write_index(index, path)
  size = folder_bytes(path)
  os.remove(path)
  return size


def folder_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def _timed_search(fn, queries, repeats: int):
  """``(result, best seconds)`` of ``fn(queries)`` after a warm-up call on a few queries."""
  fn(queries[:8])
  best, out = math.inf, None
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    out = fn(queries)
    best = min(best, time.perf_counter() - start)
  return out, best


def recall_at_k(found: np.ndarray, reference: np.ndarray) -> float:
  k = reference.shape[1]
  hits = sum(len(np.intersect1d(a[:k], b)) for a, b in zip(found, reference, strict=True))
  return float(hits / (k * len(reference)))


# -- data -------------------------------------------------------------------------------------
def data_spec(n: int, d: int, num_clusters: int, spread: float, num_classes: int, seed: int,
              shard_rows: int) -> dict:
  return {"kind": "resmem_jax.bench.memory_scale clustered rows", "n": int(n), "d": int(d),
          "num_clusters": int(num_clusters), "spread": float(spread),
          "num_classes": int(num_classes), "seed": int(seed), "shard_rows": int(shard_rows),
          "residuals": f"sparse top-{RESIDUAL_TOP_M} of onehot(label) - softmax(logits)"}


def _centres(spec: dict) -> np.ndarray:
  rng = np.random.default_rng(spec["seed"])
  return rng.normal(size=(spec["num_clusters"], spec["d"])).astype(np.float32)


def _draw(rng, centres: np.ndarray, count: int, spread: float):
  """``(points [count, d] float32, cluster ids [count])`` from the mixture."""
  ids = rng.integers(0, centres.shape[0], size=count)
  points = centres[ids]
  points += spread * rng.standard_normal(points.shape, np.float32)
  return points, ids


def queries_for(spec: dict, num_queries: int) -> np.ndarray:
  rng = np.random.default_rng([spec["seed"], QUERY_SEED_OFFSET])
  return _draw(rng, _centres(spec), num_queries, spec["spread"])[0]


def write_data(folder: str, spec: dict, log=print) -> float:
  """Writes the shards that ``folder`` lacks (a resumed run continues); returns seconds spent."""
  from resmem_jax.core.residuals import residuals as make_residuals  # pylint: disable=g-import-not-at-top
  from resmem_jax.core.residuals import sparse_top_m  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import shards  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  top_m = jax.jit(sparse_top_m, static_argnames="top_m")
  start = time.perf_counter()
  done = set(shards.prepare(folder, spec))
  centres = _centres(spec)
  n, rows = spec["n"], spec["shard_rows"]
  count = -(-n // rows)
  for index in range(count):
    if index in done:
      continue
    rng = np.random.default_rng([spec["seed"], index])
    size = min(rows, n - index * rows)
    keys = np.empty((size, spec["d"]), np.float32)
    labels = np.empty(size, np.int32)
    columns, values = [], []
    for lo in range(0, size, ROWS_PER_DRAW):
      hi = min(size, lo + ROWS_PER_DRAW)
      keys[lo:hi], cluster = _draw(rng, centres, hi - lo, spec["spread"])
      # Labels follow the clusters (as classes do in trained embeddings); logits are noise.
      labels[lo:hi] = cluster % spec["num_classes"]
      logits = 2.0 * rng.standard_normal((hi - lo, spec["num_classes"]), np.float32)
      c, v = top_m(make_residuals(labels[lo:hi], logits, 1.0), top_m=RESIDUAL_TOP_M,
                   labels=labels[lo:hi])
      columns.append(np.asarray(c, np.int32))
      values.append(np.asarray(v, np.float32))
    shards.write_shard(folder, index, keys,
                       {"sparse_columns": np.concatenate(columns),
                        "sparse_values": np.concatenate(values)}, labels)
    log(f"  shard {index + 1}/{count} written ({time.perf_counter() - start:.0f} s)")
  return time.perf_counter() - start


def shard_keys(folder: str):
  """Yields ``(first row, float32 keys)`` of each complete shard, in order, one in RAM at a time."""
  from resmem_jax.memory import shards  # pylint: disable=g-import-not-at-top
  start = 0
  for index in shards.completed(folder):
    with np.load(shards.shard_path(folder, index), allow_pickle=False) as data:
      keys = data["keys"]
    yield start, keys
    start += keys.shape[0]


def exact_top_k(folder: str, queries: np.ndarray, k: int, limit: int | None = None) -> np.ndarray:
  """Exact top-k ids over the first ``limit`` rows of the shards, streaming: faiss's k + 10
  candidates per shard (a float32 expansion), re-scored in float64, merged."""
  import faiss  # pylint: disable=g-import-not-at-top
  best_d = np.full((len(queries), 0), np.inf)
  best_i = np.zeros((len(queries), 0), np.int64)
  wide_queries = queries.astype(np.float64)
  for start, keys in shard_keys(folder):
    if limit is not None and start >= limit:
      break
    if limit is not None:
      keys = keys[:limit - start]
    flat = faiss.IndexFlatL2(keys.shape[1])
    flat.add(keys)
    _, ids = flat.search(queries, min(k + 10, keys.shape[0]))
    del flat
    rows = keys[ids].astype(np.float64) - wide_queries[:, None, :]
    dist = np.einsum("qkd,qkd->qk", rows, rows)
    best_d = np.concatenate([best_d, dist], axis=1)
    best_i = np.concatenate([best_i, ids + start], axis=1)
    order = np.lexsort((best_i, best_d), axis=1)[:, :k]
    best_d = np.take_along_axis(best_d, order, axis=1)
    best_i = np.take_along_axis(best_i, order, axis=1)
  return best_i


def reference(folder: str, spec: dict, queries: np.ndarray, k: int, log=print) -> np.ndarray:
  """The exact top-k of ``queries``, cached in ``folder`` under a digest of spec, queries and k."""
  digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode() + queries.tobytes()
                          + str(k).encode()).hexdigest()[:16]
  path = os.path.join(folder, f"reference-{digest}.npy")
  if os.path.isfile(path):
    return np.load(path)
  start = time.perf_counter()
  ids = exact_top_k(folder, queries, k)
  np.save(path + ".partial.npy", ids)
  os.replace(path + ".partial.npy", path)
  log(f"  exact top-{k} of {len(queries)} queries over {spec['n']} rows: "
      f"{time.perf_counter() - start:.0f} s (cached in {path})")
  return ids


# -- methods (each in its own process) --------------------------------------------------------
def _row(method: str, setting: str, n: int, build_s: float, peak: int, ram: int, disk: int,
         seconds: float, num_queries: int, recall: float, **extra) -> dict:
  return {"method": method, "setting": setting, "n": int(n), "build_s": round(build_s, 2),
          "peak_rss_gb": round(peak / 2**30, 3), "ram_bytes_per_row": round(ram / n, 1),
          "disk_bytes_per_row": round(disk / n, 1),
          "queries_per_s": round(num_queries / seconds, 1), "recall": round(recall, 4),
          # the host's 1-minute load just after the sweep: q/s compare only at similar load
          "load_1m": round(os.getloadavg()[0], 2), **extra}


def _scann_leaves(default: int, num_leaves: int, leaves: list[int] | None) -> list[int]:
  if leaves:
    return sorted({min(num_leaves, max(1, int(v))) for v in leaves})
  return sorted({min(num_leaves, max(1, default * f // 4)) for f in (1, 2, 4, 8)})


def run_scann(task: dict) -> list[dict]:
  from resmem_jax.memory import io  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import scann as scann_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import shards  # pylint: disable=g-import-not-at-top
  scann_lib._import_scann()  # pylint: disable=protected-access  # its import is not the memory's
  queries, ref, k = np.load(task["queries"]), np.load(task["reference"]), task["k"]
  _trim()
  rss0 = rss_bytes()
  start = time.perf_counter()
  memory = shards.build_memory_from_shards(
      task["folder"], num_outputs=task["num_classes"], backend="scann",
      key_format=task["key_format"], residual_format=task["residual_format"],
      top_m=RESIDUAL_TOP_M, **task["scann_options"])
  build_s = time.perf_counter() - start
  peak_build = peak_rss_bytes()
  _trim()
  ram_built = rss_bytes() - rss0
  n = memory.size
  # Saved before it is searched, as the job does: the save reads ScaNN's index back from its
  # files, which drops the slack of the streamed build, and ScaNN's serializer has a transient of
  # its own, so both the RAM searched and the peak include it.
  save_to = os.path.join(task["scratch"], f"scann-{task['key_format']}")
  shutil.rmtree(save_to, ignore_errors=True)
  start = time.perf_counter()
  memory.save(save_to)
  save_s = time.perf_counter() - start
  disk = folder_bytes(save_to)
  index_disk = folder_bytes(os.path.join(save_to, io.INDEX_DIR))
  shutil.rmtree(save_to, ignore_errors=True)
  _trim()
  ram = rss_bytes() - rss0
  stored = memory.bytes_per_example()
  options = memory.backend_options
  settings: list[dict] = [{}]
  if options["mode"] == "tree_ah":
    leaves = _scann_leaves(int(options["leaves_to_search"]), int(options["num_leaves"]),
                           task.get("scann_leaves"))
    reorders = task.get("scann_reorders") or [int(options["reorder"])]
    settings = [{"leaves_to_search": lv, "reorder": int(r)} for lv in leaves for r in reorders]
  elif options["mode"] == "ah":
    settings = [{"reorder": int(r)} for r in task.get("scann_reorders") or [options["reorder"]]]
  results = []
  for setting in settings:
    if setting:
      memory.index.set_query_settings(**setting)
    (_, found), seconds = _timed_search(lambda q: memory.search(q, k), queries, task["repeats"])
    results.append((setting or {"mode": options["mode"]}, seconds, recall_at_k(found, ref)))
  peak = peak_rss_bytes()
  built = {name: options[name] for name in ("mode", "num_leaves", "dims_per_block",
                                            "training_sample_size") if name in options}
  return [_row(f"scann {task['key_format']}", ", ".join(f"{a}={b}" for a, b in setting.items()),
               n, build_s, peak, ram, disk, seconds, len(queries), recall,
               rss0_gb=round(rss0 / 2**30, 3), stored_bytes_per_row=stored,
               index_disk_bytes_per_row=round(index_disk / n, 1), scann_options=built,
               residual_format=task["residual_format"], save_s=round(save_s, 1),
               peak_build_gb=round(peak_build / 2**30, 3),
               ram_built_bytes_per_row=round(ram_built / n, 1))
          for setting, seconds, recall in results]


def _pq_subquantizers(dim: int, code_bytes: int) -> int:
  """The most subquantizers <= code_bytes that divide dim (faiss's PQ needs a divisor)."""
  return max(m for m in range(1, min(dim, code_bytes) + 1) if dim % m == 0)


def _sample_rows(folder: str, n: int, count: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  take = np.sort(rng.choice(n, min(n, count), replace=False))
  parts = []
  for start, keys in shard_keys(folder):
    mine = take[(take >= start) & (take < start + len(keys))] - start
    parts.append(keys[mine])
  return np.concatenate(parts)


def run_ivfpq(task: dict) -> list[dict]:
  import faiss  # pylint: disable=g-import-not-at-top
  faiss.omp_set_num_threads(task["threads"])
  queries, ref, k, folder = np.load(task["queries"]), np.load(task["reference"]), task["k"], \
      task["folder"]
  n, d = task["n"], queries.shape[1]
  nlist = task["nlist"] or 2 ** round(math.log2(2 * math.sqrt(n)))
  m = _pq_subquantizers(d, task["pq_bytes"])
  _trim()
  rss0 = rss_bytes()
  start = time.perf_counter()
  sample = _sample_rows(folder, n, task["train_rows"])
  index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, m, 8)
  index.train(sample)
  del sample
  for _, keys in shard_keys(folder):
    index.add(keys)
  del keys  # the last shard's rows, else counted in RAM B/row
  build_s = time.perf_counter() - start
  _trim()
  ram = rss_bytes() - rss0
  setting = f"nlist={nlist}, PQ{m}x8"
  plain = []
  for nprobe in task["nprobes"]:
    index.nprobe = int(nprobe)
    (_, found), seconds = _timed_search(lambda q: index.search(q, k), queries, task["repeats"])
    plain.append((nprobe, seconds, recall_at_k(found, ref)))
  peak = peak_rss_bytes()
  disk = _faiss_file_bytes(faiss, index, task["scratch"], "ivfpq.faiss")
  common = {"rss0_gb": round(rss0 / 2**30, 3), "threads": task["threads"],
            "code_bytes": m, "train_rows": min(n, task["train_rows"]),
            # faiss's default L2 tables (nlist x m x 256 floats), counted in RAM B/row
            "precomputed_table_bytes_per_row": round(4 * _table_size(index) / n, 1)}
  rows = [_row("faiss IVFPQ", f"{setting}, nprobe={p}", n, build_s, peak, ram, disk, s,
               len(queries), r, **common) for p, s, r in plain]
  if not task["rerank_depths"]:
    return rows
  # kNN-LM's re-rank: float16 keys beside the index, the top candidates re-scored exactly.
  start = time.perf_counter()
  keys16 = np.empty((n, d), np.float16)
  for first, keys in shard_keys(folder):
    keys16[first:first + len(keys)] = keys
  del keys
  build_s += time.perf_counter() - start
  _trim()
  ram_rerank = rss_bytes() - rss0
  for nprobe in task["nprobes"]:
    index.nprobe = int(nprobe)
    for depth in task["rerank_depths"]:
      def search(q, depth=depth):
        _, ids = index.search(q, depth)
        return _rerank16(q, keys16, ids, k)
      found, seconds = _timed_search(search, queries, task["repeats"])
      rows.append(_row("faiss IVFPQ+rerank", f"{setting}, nprobe={nprobe}, rerank={depth}",
                       n, build_s, peak_rss_bytes(), ram_rerank, 0, seconds, len(queries),
                       recall_at_k(found, ref), **common))
  peak = peak_rss_bytes()
  path16 = os.path.join(task["scratch"], "keys16.npy")
  np.save(path16, keys16)
  disk = _faiss_file_bytes(faiss, index, task["scratch"], "ivfpq.faiss") + folder_bytes(path16)
  os.remove(path16)
  for row in rows:
    if row["method"] == "faiss IVFPQ+rerank":
      row["disk_bytes_per_row"] = round(disk / n, 1)
      row["peak_rss_gb"] = round(peak / 2**30, 3)
  return rows


def _table_size(index) -> int:
  try:
    return int(index.precomputed_table.size())
  except AttributeError:
    return 0


def _rerank16(queries: np.ndarray, keys16: np.ndarray, ids: np.ndarray, k: int,
              chunk: int = 256) -> np.ndarray:
  """The k nearest of each query's candidate ``ids`` (-1: none) by distance to the float16 keys."""
  out = np.empty((len(queries), k), np.int64)
  for lo in range(0, len(queries), chunk):
    part = ids[lo:lo + chunk]
    rows = keys16[np.maximum(part, 0)].astype(np.float32)
    rows -= queries[lo:lo + chunk, None, :]
    dist = np.einsum("qkd,qkd->qk", rows, rows)
    dist[part < 0] = np.inf
    best = np.argpartition(dist, k - 1, axis=1)[:, :k] if dist.shape[1] > k \
        else np.argsort(dist, axis=1)
    order = np.argsort(np.take_along_axis(dist, best, axis=1), axis=1)
    out[lo:lo + chunk] = np.take_along_axis(part, np.take_along_axis(best, order, axis=1), axis=1)
  return out


def run_hnsw(task: dict) -> list[dict]:
  import faiss  # pylint: disable=g-import-not-at-top
  faiss.omp_set_num_threads(task["threads"])
  queries, ref, k, folder = np.load(task["queries"]), np.load(task["reference"]), task["k"], \
      task["folder"]
  n, d = task["n"], queries.shape[1]
  _trim()
  rss0 = rss_bytes()
  index = faiss.IndexHNSWFlat(d, task["hnsw_m"])
  budget = float(task["hnsw_budget_s"])
  chunk = max(10_000, n // 100)
  start = time.perf_counter()
  last, stopped = 0.0, False
  for _, keys in shard_keys(folder):
    for lo in range(0, len(keys), chunk):
      # HNSW inserts slow down as the graph grows: the last chunk's time, plus a margin.
      # (The first chunk is always built.)
      if last and time.perf_counter() - start + 1.2 * last * min(chunk, len(keys) - lo) / chunk > budget:
        stopped = True
        break
      t = time.perf_counter()
      index.add(keys[lo:lo + chunk])
      last = (time.perf_counter() - t) * chunk / min(chunk, len(keys) - lo)
    del keys
    if stopped:
      break
  build_s = time.perf_counter() - start
  built = index.ntotal
  _trim()
  ram = rss_bytes() - rss0
  extra = {"rss0_gb": round(rss0 / 2**30, 3), "threads": task["threads"],
           "ef_construction": index.hnsw.efConstruction}
  if built < n:
    # The budget ran out: score against the exact top-k of the rows it holds, and say so.
    ref = exact_top_k(folder, queries, k, limit=built)
    extra["prefix_of"] = n
    extra["note"] = (f"build budget {budget:g} s: indexed the first {built} of {n} rows "
                     f"(recall vs the exact top-{k} of that prefix)")
  results = []
  for ef in task["hnsw_ef"]:
    index.hnsw.efSearch = int(ef)
    (_, found), seconds = _timed_search(lambda q: index.search(q, k), queries, task["repeats"])
    results.append((ef, seconds, recall_at_k(found, ref)))
  peak = peak_rss_bytes()
  disk = _faiss_file_bytes(faiss, index, task["scratch"], "hnsw.faiss")
  return [_row("faiss HNSWFlat", f"M={task['hnsw_m']}, ef={ef}", built, build_s, peak, ram, disk,
               s, len(queries), r, **extra) for ef, s, r in results]


RUNNERS = {"scann": run_scann, "ivfpq": run_ivfpq, "hnsw": run_hnsw}


def _spawn(task: dict, scratch: str, log=print) -> list[dict]:
  """Runs ``task`` in a fresh Python process; its rows, or one row saying why it failed."""
  name = task["name"].replace(" ", "_")
  task_path = os.path.join(scratch, f"task-{name}.json")
  out_path = os.path.join(scratch, f"rows-{name}.json")
  with open(task_path, "w") as f:
    json.dump({**task, "out": out_path}, f)
  if os.path.exists(out_path):
    os.remove(out_path)
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "resmem_jax.bench.memory_scale", task_path],
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0 or not os.path.isfile(out_path):
    log(f"  {task['name']} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return [{"method": task["name"], "setting": "failed", "error": proc.stderr[-2000:],
             "exit_code": proc.returncode}]
  with open(out_path) as f:
    rows = json.load(f)
  log(f"  {task['name']}: {time.perf_counter() - start:.0f} s in its process")
  return rows


# -- the run ----------------------------------------------------------------------------------
HEADER = (f"{'method':<20} {'setting':<44} {'n':>9} {'build s':>8} {'peak GB':>8} {'RAM B/row':>9} "
          f"{'disk B/row':>10} {'queries/s':>10} {'recall':>7}")


def format_row(row: dict) -> str:
  if "error" in row:
    return f"{row['method']:<20} FAILED (exit {row['exit_code']})"
  note = "  *prefix" if "prefix_of" in row else ""
  return (f"{row['method']:<20} {row['setting']:<44} {row['n']:>9} {row['build_s']:>8.1f} "
          f"{row['peak_rss_gb']:>8.2f} {row['ram_bytes_per_row']:>9.0f} "
          f"{row['disk_bytes_per_row']:>10.0f} {row['queries_per_s']:>10.0f} "
          f"{row['recall']:>7.4f}{note}")


def summary(rows: list[dict], targets=(0.8, 0.9, 0.95, 0.99)) -> list[str]:
  """For each recall target, each method's fastest row reaching it (how to read the sweep)."""
  lines = [f"{'recall >=':>9} {'method':<20} {'queries/s':>10} {'recall':>7} {'RAM B/row':>9} "
           f"{'disk B/row':>10}  setting"]
  methods = list(dict.fromkeys(r["method"] for r in rows if "error" not in r))
  for target in targets:
    for method in methods:
      good = [r for r in rows if r["method"] == method and "error" not in r
              and r["recall"] >= target]
      if not good:
        best = max(r["recall"] for r in rows if r["method"] == method and "error" not in r)
        lines.append(f"{target:>9} {method:<20} {'-':>10} (best recall {best:.4f})")
        continue
      r = max(good, key=lambda r: r["queries_per_s"])
      lines.append(f"{target:>9} {method:<20} {r['queries_per_s']:>10.0f} {r['recall']:>7.4f} "
                   f"{r['ram_bytes_per_row']:>9.0f} {r['disk_bytes_per_row']:>10.0f}  "
                   f"{r['setting']}")
  return lines


def method_order(key_formats: list[str], peers: list[str]) -> list[tuple[str, str]]:
  """The first key format, IVFPQ, HNSW, then the other formats: the headline comparison first,
  so a run cut short still has it."""
  scann = [("scann", f) for f in key_formats]
  ivf = [("ivfpq", "")] if {"ivfpq", "ivfpq_rerank"} & set(peers) else []
  hnsw = [("hnsw", "")] if "hnsw" in peers else []
  return scann[:1] + ivf + hnsw + scann[1:]


def run(n: int, d: int, *, shard_dir: str, num_queries: int = 2000, k: int = 10,
        key_formats=("float32", "bfloat16", "float16", "int8"), peers=("ivfpq", "ivfpq_rerank", "hnsw"),
        num_clusters: int = 1000, spread: float = 0.25, num_classes: int = 65, seed: int = 0,
        shard_rows: int = 500_000, residual_format: str = "sparse_float16",
        scann_options: dict | None = None, scann_leaves=None, scann_reorders=(100, 200, 400),
        nlist: int = 0, pq_bytes: int = 64, train_rows: int = 250_000,
        nprobes=(8, 16, 32, 64), rerank_depths=(100, 400), hnsw_m: int = 32,
        hnsw_ef=(16, 32, 64, 128), hnsw_budget_s: float = 1200.0, threads: int = 2,
        repeats: int = 2, out: str | None = None, log=print) -> dict:
  """Writes (or reuses) the data, then runs every method; returns (and writes to ``out``) the
  JSON report, rewritten after each method."""
  spec = data_spec(n, d, num_clusters, spread, num_classes, seed, shard_rows)
  folder = os.path.join(shard_dir, f"{n}x{d}-c{num_clusters}-s{seed}")
  scratch = os.path.join(folder, "scratch")
  log(f"data: {n} x {d}, {num_clusters} unit-normal centres, spread {spread}, shards of "
      f"{shard_rows} rows in {folder}")
  data_s = write_data(folder, spec, log)
  os.makedirs(scratch, exist_ok=True)
  queries = queries_for(spec, num_queries)
  ref = reference(folder, spec, queries, k, log)
  np.save(os.path.join(scratch, "queries.npy"), queries)
  np.save(os.path.join(scratch, "reference.npy"), ref)
  report: dict[str, Any] = {
      "data": {**spec, "folder": folder, "write_s": round(data_s, 1),
               "num_queries": num_queries, "k": k},
      "machine": {"cpus": os.cpu_count(), "threads": threads}, "rows": []}
  base = {"folder": folder, "scratch": scratch, "queries": os.path.join(scratch, "queries.npy"),
          "reference": os.path.join(scratch, "reference.npy"), "k": k, "n": n,
          "repeats": repeats, "threads": threads, "num_classes": num_classes}
  log(HEADER)
  for kind, key_format in method_order(list(key_formats), list(peers)):
    if kind == "scann":
      task = {**base, "name": f"scann {key_format}", "kind": kind, "key_format": key_format,
              "residual_format": residual_format, "scann_options": dict(scann_options or {}),
              "scann_leaves": list(scann_leaves or []), "scann_reorders": list(scann_reorders)}
    elif kind == "ivfpq":
      task = {**base, "name": "faiss IVFPQ", "kind": kind, "nlist": nlist, "pq_bytes": pq_bytes,
              "train_rows": train_rows, "nprobes": list(nprobes),
              "rerank_depths": list(rerank_depths) if "ivfpq_rerank" in peers else []}
    else:
      task = {**base, "name": "faiss HNSW", "kind": kind, "hnsw_m": hnsw_m,
              "hnsw_ef": list(hnsw_ef), "hnsw_budget_s": hnsw_budget_s}
    rows = _spawn(task, scratch, log)
    if kind == "ivfpq" and "ivfpq" not in peers:
      rows = [r for r in rows if r["method"] != "faiss IVFPQ"]
    for row in rows:
      log(format_row(row))
      if "note" in row:
        log(f"  * {row['note']}")
    report["rows"].extend(rows)
    if out:
      _write_json(out, report)
  log("\nfastest setting of each method at each recall target:")
  for line in summary(report["rows"]):
    log(line)
  return report


def _write_json(path: str, report: dict) -> None:
  partial = path + ".partial"
  with open(partial, "w") as f:
    json.dump(report, f, indent=1)
  os.replace(partial, path)


def _worker(task_path: str) -> None:
  with open(task_path) as f:
    task = json.load(f)
  rows = RUNNERS[task["kind"]](task)
  with open(task["out"], "w") as f:
    json.dump(rows, f)


if __name__ == "__main__":
  _worker(sys.argv[1])
