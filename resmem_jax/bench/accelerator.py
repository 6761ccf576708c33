"""One run that measures an accelerator (behind ``experiments/bench_accelerator.py``).

    from resmem_jax.bench import accelerator
    result = accelerator.run(size="full", out="/tmp/accelerator.json")   # prints the table too

Sections (:data:`SECTIONS`, each timed on its own; one that fails records its error and the
others still run):

  train        ResNet-50 (ImageNet shapes) and CIFAR ResNet-20 training steps (SGD + momentum)
               in bfloat16 and float32: images/s and MFU, the model's FLOPs per second (analytic:
               3 x the forward convolutions and dot products) over the devices' peak in that
               dtype; XLA's cost-analysis FLOPs beside it.
  search       ``exact`` and ``approx`` memory search over n x d clustered keys: queries/s of
               ``memory.search`` end to end (device search, host certification, host re-rank)
               and of the device search alone (the jitted candidate search over queries already
               on the device), each against its FLOP bound (2 n d per query at the float32
               HIGHEST peak) and memory-bandwidth bound (the keys read once per pass); recall@k
               of ``approx`` against ``exact``.
  mnist        the MNIST main job (``resmem-jax --config=mnist:small_mlp``, in process): wall
               time (data preparation apart), base and ResMem test accuracy.
  shakespeare  the tiny_shakespeare job: its memory build (training split rows/s: inference
               pass, residual store and index), its query rate (test rows/s of neighbour query
               and combination) and ``memory.search`` alone on the saved memory.

Peaks come from :data:`PEAKS` (vendor figures, matched on ``jax.devices()[0].device_kind``); on
any other device (CPU) the measured matmul is the peak and the measured read bandwidth the
bandwidth, and the JSON says so. The matmul is measured on every device and reported beside the
table's figure.

``size="tiny"`` shrinks every section (small models and images, 4k keys, TFDS mock data for the
jobs) so that the whole run takes about a minute on a 2-core CPU (the slow tests run it). ``"full"``
is sized for at most 8 minutes on one H100 (an estimate: not yet run on a GPU); on a CPU it
would take hours (ResNet-50 steps at 224 x 224, ``approx_min_k``'s exact fallback over 1M keys),
so there run single sections (``sections=("mnist",)``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import re
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax import jsonio
from resmem_jax import mesh as mesh_lib
from resmem_jax import models
from resmem_jax.bench.synthetic import clustered_points
from resmem_jax.bench.train_step import forward_matmul_flops
from resmem_jax.settings import ModelSettings, TrainSettings

SECTIONS = ("train", "search", "mnist", "shakespeare")
SIZE_NAMES = ("full", "tiny")
SCHEMA_VERSION = 1
MEASURED = "measured matmul"
# The largest matmul measured on a CPU: a 2-core CPU is near its matmul peak at 1024 already,
# while the accelerators' 8192 would take minutes there.
CPU_MATMUL_SIZE = 1024


# ----------------------------------------------------------------------------- peaks


@dataclasses.dataclass(frozen=True)
class Peak:
  """One chip's vendor peaks: TFLOP/s by compute mode and HBM GB/s."""
  name: str
  pattern: str  # re.search on device_kind, case-insensitive; PEAKS is searched in order
  bfloat16: float
  float32: float  # a float32 matmul at JAX's default precision (what a float32 model runs)
  float32_highest: float  # at Precision.HIGHEST (the memory searches' lower bounds)
  hbm_gbps: float


# Vendor datasheet figures per chip, dense (the "with sparsity" figures halved). JAX's default
# precision runs a float32 matmul as TF32 on NVIDIA Ampere and later and as one bfloat16 pass on
# TPU, so "float32" is TF32 or bfloat16 there; Precision.HIGHEST is true FP32 on NVIDIA and six
# bfloat16 passes on TPU. More specific names come first (H100 PCIe before H100, GH200 before
# H200, TPU v5 lite before TPU v5).
PEAKS = (
    Peak("NVIDIA H100 PCIe", r"H100.*PCIe", 756.0, 378.0, 51.0, 2000.0),
    Peak("NVIDIA H100 NVL", r"H100.*NVL", 835.0, 417.5, 60.0, 3900.0),
    Peak("NVIDIA H100 SXM", r"H100", 989.5, 494.5, 67.0, 3350.0),
    Peak("NVIDIA GH200", r"GH200", 989.5, 494.5, 67.0, 4000.0),
    Peak("NVIDIA H200 NVL", r"H200.*NVL", 835.0, 417.5, 60.0, 4800.0),
    Peak("NVIDIA H200 SXM", r"H200", 989.5, 494.5, 67.0, 4800.0),
    Peak("NVIDIA A100 SXM 80GB", r"A100.*SXM.*80GB", 312.0, 156.0, 19.5, 2039.0),
    Peak("NVIDIA A100 PCIe 80GB", r"A100.*80GB", 312.0, 156.0, 19.5, 1935.0),
    Peak("NVIDIA A100 40GB", r"A100", 312.0, 156.0, 19.5, 1555.0),
    # Volta has no bfloat16 or TF32 units: both run at the FP32 rate.
    Peak("NVIDIA V100 SXM2", r"V100.*SXM", 15.7, 15.7, 15.7, 900.0),
    Peak("NVIDIA V100 PCIe", r"V100", 14.0, 14.0, 14.0, 900.0),
    Peak("NVIDIA L4", r"\bL4\b", 121.0, 60.0, 30.3, 300.0),
    Peak("TPU v4", r"^TPU v4$", 275.0, 275.0, 275.0 / 6, 1200.0),
    Peak("TPU v5e", r"^TPU v5 ?(lite|e)$", 197.0, 197.0, 197.0 / 6, 819.0),
    Peak("TPU v5p", r"^TPU v5p?$", 459.0, 459.0, 459.0 / 6, 2765.0),
    Peak("TPU v6e", r"^TPU v6 ?(lite|e)$", 918.0, 918.0, 918.0 / 6, 1640.0),
)
# A peak's compute mode by a step's dtype (float16 runs on the bfloat16 units' rate).
MODE_OF_DTYPE = {"bfloat16": "bfloat16", "float16": "bfloat16", "float32": "float32"}


def lookup_peak(device_kind: str) -> Peak | None:
  """The first :data:`PEAKS` entry whose pattern ``device_kind`` matches, or None."""
  for peak in PEAKS:
    if re.search(peak.pattern, device_kind.strip(), re.IGNORECASE):
      return peak
  return None


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Fastest wall time of ``repeats`` calls of ``fn`` (blocked on its result), after one
  untimed call (compilation); other load on a shared machine only ever adds time."""
  jax.block_until_ready(fn())
  best = math.inf
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def measure_matmul_tflops(size: int, dtype: str = "float32", precision=None,
                          repeats: int = 5) -> float:
  """TFLOP/s of one ``size`` x ``size`` x ``size`` matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (size, size), models.compute_dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (size, size), models.compute_dtype(dtype))
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
  return 2.0 * size ** 3 / _best_seconds(lambda: matmul(a, b), repeats) / 1e12


def measure_read_gbps(megabytes: int, repeats: int = 5) -> float:
  """GB/s of summing a float32 array of ``megabytes`` MB (read once) on the default device."""
  x = jnp.ones((megabytes * (1 << 20) // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  return x.size * 4 / _best_seconds(lambda: total(x), repeats) / 1e9


def measure_peaks(matmul_size: int, bandwidth_mb: int, repeats: int = 5) -> dict:
  """The measured matmul TFLOP/s by compute mode, and the measured read bandwidth."""
  highest = jax.lax.Precision.HIGHEST
  return {
      "bfloat16_tflops": measure_matmul_tflops(matmul_size, "bfloat16", repeats=repeats),
      "float32_tflops": measure_matmul_tflops(matmul_size, "float32", repeats=repeats),
      "float32_highest_tflops": measure_matmul_tflops(matmul_size, "float32", highest, repeats),
      "matmul_size": matmul_size,
      "read_gbps": measure_read_gbps(bandwidth_mb, repeats),
      "read_megabytes": bandwidth_mb,
  }


def device_peaks(device_kind: str, measured: dict) -> dict:
  """Per-chip peaks: the vendor table's for a known ``device_kind``, else the ``measured`` ones
  (:func:`measure_peaks`), with ``source`` saying which."""
  peak = lookup_peak(device_kind)
  if peak is None:
    return {"source": MEASURED, "bandwidth_source": "measured read (sum of "
            f"{measured['read_megabytes']} MB)",
            "bfloat16_tflops": measured["bfloat16_tflops"],
            "float32_tflops": measured["float32_tflops"],
            "float32_highest_tflops": measured["float32_highest_tflops"],
            "hbm_gbps": measured["read_gbps"], "measured": measured}
  source = f"vendor table: {peak.name}"
  return {"source": source, "bandwidth_source": source, "bfloat16_tflops": peak.bfloat16,
          "float32_tflops": peak.float32, "float32_highest_tflops": peak.float32_highest,
          "hbm_gbps": peak.hbm_gbps, "measured": measured}


# ----------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class StepModel:
  """A training step to time: the model and the shape of its batch."""
  label: str
  model: ModelSettings
  image_size: int
  num_classes: int
  batch_size: int


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Everything :func:`run` sizes (see :data:`SIZES`)."""
  step_models: tuple[StepModel, ...]
  dtypes: tuple[str, ...]
  steps: int  # timed consecutive steps per window
  windows: int  # timed windows; the fastest is kept
  search_keys: int
  search_dim: int
  search_queries: int
  k: int
  search_repeats: int
  matmul_size: int
  bandwidth_mb: int
  # The jobs: None runs the config as it is, on the real data set; a number runs it for that
  # many training steps on that many TFDS mock examples.
  job_steps: int | None
  mock_examples: int | None


# full: ResNet-50 at the ImageNet recipe's 256 images per chip (float32 fits 80 GB); ResNet-20
# at 1024, since at the CIFAR recipe's 128 its step is a few small kernels, launch-bound on an
# accelerator. tiny keeps every layer (so the same programs compile) at small widths and images.
SIZES = {
    "full": Sizes(
        step_models=(
            StepModel("resnet50", ModelSettings(name="resnet", depth=50, width=1.0), 224, 1000,
                      256),
            StepModel("resnet20", ModelSettings(name="cifar_resnet", depth=20, width=1.0), 32,
                      10, 1024)),
        dtypes=("bfloat16", "float32"), steps=20, windows=3,
        search_keys=1_000_000, search_dim=128, search_queries=10_000, k=10, search_repeats=3,
        matmul_size=8192, bandwidth_mb=1024, job_steps=None, mock_examples=None),
    "tiny": Sizes(
        step_models=(
            StepModel("resnet50", ModelSettings(name="resnet", depth=50, width=0.125), 32, 10, 4),
            StepModel("resnet20", ModelSettings(name="cifar_resnet", depth=20, width=0.25), 16,
                      10, 8)),
        dtypes=("bfloat16", "float32"), steps=2, windows=2,
        search_keys=4096, search_dim=16, search_queries=256, k=10, search_repeats=2,
        matmul_size=256, bandwidth_mb=16, job_steps=5, mock_examples=48),
}


# ----------------------------------------------------------------------------- train


def time_train_step(step_model: StepModel, dtype: str, steps: int, windows: int) -> dict:
  """Images/s and FLOPs of one model's jitted train step on all devices (batch split over
  them): the fastest of ``windows`` windows of ``steps`` consecutive steps."""
  from resmem_jax.training import optimizer  # pylint: disable=g-import-not-at-top
  from resmem_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax.training import steps as steps_lib  # pylint: disable=g-import-not-at-top
  m = step_model
  module = models.build_model(m.model, m.num_classes, dtype=dtype)
  mesh = mesh_lib.data_mesh()
  train = TrainSettings(learning_rate=0.1, momentum=0.9, weight_decay=1e-4, schedule="cosine")
  tx = optimizer.make_optimizer(train, optimizer.make_schedule(train, 100, 10_000))
  rng = np.random.default_rng(0)
  host = {"inputs": rng.normal(size=(m.batch_size, m.image_size, m.image_size, 3))
          .astype(np.float32),
          "labels": rng.integers(0, m.num_classes, m.batch_size).astype(np.int32)}
  state = state_lib.init_state(module, tx, host["inputs"][:1], 0, mesh)
  # Model FLOPs from the float32 module (the contractions do not depend on the dtype).
  reference = models.build_model(m.model, m.num_classes)
  analytic = 3.0 * forward_matmul_flops(  # backward = grads wrt activations and wrt weights
      lambda v, x: reference.apply(v, x, train=False), state.variables(), host["inputs"])
  batch = mesh_lib.shard_batch(host, mesh)
  replicated = mesh_lib.replicated(mesh)
  step = jax.jit(steps_lib.make_train_step(module, tx, 0.0, jax.random.key(0)),
                 out_shardings=(replicated, replicated), donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = (cost or {}).get("flops")  # None where the backend gives no cost analysis
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready((state, metrics))
  best = math.inf
  for _ in range(max(1, windows)):
    start = time.perf_counter()
    for _ in range(steps):  # back to back, as training dispatches them
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    best = min(best, (time.perf_counter() - start) / steps)
  return {"model": m.label, "depth": m.model.depth, "width": m.model.width, "dtype": dtype,
          "batch_size": m.batch_size, "image_size": m.image_size, "num_classes": m.num_classes,
          "compile_s": compile_s, "step_ms": 1e3 * best, "images_per_s": m.batch_size / best,
          "analytic_flops_per_step": analytic,
          "xla_flops_per_step": None if xla_flops is None else float(xla_flops)}


def mfu(flops_per_step: float | None, step_s: float, peak_tflops: float,
        num_devices: int = 1) -> float | None:
  """Model FLOPs utilisation: ``flops_per_step / step_s`` over ``num_devices`` chips' peak."""
  if flops_per_step is None or not math.isfinite(flops_per_step):
    return None
  return flops_per_step / step_s / (peak_tflops * 1e12 * num_devices)


def run_train(sizes: Sizes, peaks: dict, log: Callable[[str], None] = print) -> dict:
  rows = []
  count = jax.device_count()
  for step_model in sizes.step_models:
    for dtype in sizes.dtypes:
      try:
        row = time_train_step(step_model, dtype, sizes.steps, sizes.windows)
      except Exception as err:  # pylint: disable=broad-except  # e.g. out of memory: next row
        rows.append({"model": step_model.label, "dtype": dtype,
                     "batch_size": step_model.batch_size,
                     "error": f"{type(err).__name__}: {err}"})
        log(f"  {step_model.label} {dtype}: failed: {rows[-1]['error']}")
        continue
      peak = peaks[f"{MODE_OF_DTYPE[dtype]}_tflops"]
      seconds = row["step_ms"] / 1e3
      row.update(peak_tflops=peak, achieved_tflops=row["analytic_flops_per_step"] / seconds / 1e12,
                 mfu=mfu(row["analytic_flops_per_step"], seconds, peak, count),
                 mfu_xla=mfu(row["xla_flops_per_step"], seconds, peak, count))
      log(f"  {row['model']} {dtype}: {row['step_ms']:.2f} ms/step, MFU {row['mfu']:.3f}")
      rows.append(row)
  return {"rows": rows, "num_devices": count,
          "mfu_rule": "3 x forward conv/dot FLOPs (analytic) / step time / (devices x peak of "
                      "the dtype's compute mode: float32 at JAX's default precision)"}


# ----------------------------------------------------------------------------- search


def search_bounds(num_keys: int, dim: int, num_queries: int, key_passes: int,
                  peak_tflops: float, bandwidth_gbps: float, num_devices: int = 1) -> dict:
  """The FLOP and memory-bandwidth lower bounds on searching ``num_queries`` queries.

  FLOPs: the one matmul, ``2 n d`` per query. Bytes: the float32 keys (``4 n d``) read once per
  pass over them (a pass per query tile or chunk). The stored rows carry two more columns (the
  certified bound's terms) and the searches pad queries to whole tiles; neither is counted, so
  the bounds are the useful work's. Keys are split over ``num_devices`` chips, which run at once.
  """
  flops = 2.0 * num_keys * dim * num_queries
  key_bytes = 4.0 * num_keys * dim * key_passes
  flop_s = flops / (peak_tflops * 1e12 * num_devices)
  bandwidth_s = key_bytes / (bandwidth_gbps * 1e9 * num_devices)
  return {"flops": flops, "key_bytes": key_bytes, "key_passes": key_passes,
          "flop_bound_s": flop_s, "bandwidth_bound_s": bandwidth_s,
          "bound_s": max(flop_s, bandwidth_s)}


def against_bounds(seconds: float, num_queries: int, bounds: dict) -> dict:
  """Queries/s of a search that took ``seconds`` and the fraction of each bound it reached."""
  return {"seconds": seconds, "queries_per_s": num_queries / seconds,
          "fraction_of_flop_bound": bounds["flop_bound_s"] / seconds,
          "fraction_of_bandwidth_bound": bounds["bandwidth_bound_s"] / seconds}


def _search_plan(memory, num_queries: int, count: int):
  """``(jitted candidate search, queries per call, passes over the keys)`` as the memory's index
  runs its first pass (``count`` candidates) over ``num_queries`` queries (the index's own chunk
  and tile rules); the search function is the index's cached one, so it is compiled already."""
  from resmem_jax.memory import approx as approx_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import exact as exact_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import index as index_lib  # pylint: disable=g-import-not-at-top
  index = memory.index
  fns = index._search_fns  # pylint: disable=protected-access
  if memory.backend == "exact":
    tile = max(1, min(index.query_tile, index.query_chunk, num_queries))
    layout = (count, index.block_size, index.local_size, tile)
    fn = index_lib.bounded_put(fns, layout, lambda: exact_lib._make_search_fn(  # pylint: disable=protected-access
        index.mesh, *layout), exact_lib.MAX_SEARCH_FNS)
    chunk = -(-max(1, min(index.query_chunk, num_queries)) // tile) * tile
    return fn, chunk, -(-num_queries // chunk) * (chunk // tile)  # each tile scans every key
  chunk = max(1, min(index.options["query_chunk"],
                     approx_lib.MAX_SCORES_PER_CALL // index.local_size, num_queries))
  fn = index_lib.bounded_put(
      fns, (count, index.local_size), lambda: approx_lib._make_search_fn(  # pylint: disable=protected-access
          index.mesh, count, index.local_size, index.options["recall_target"]),
      exact_lib.MAX_SEARCH_FNS)
  return fn, chunk, -(-num_queries // chunk)


def device_search_seconds(memory, queries: np.ndarray, count: int, repeats: int):
  """``(seconds, passes over the keys)`` of the index's jitted candidate search alone over
  ``queries``: every chunk placed on the device first, the calls dispatched back to back, no
  host certification or re-ranking."""
  fn, chunk, passes = _search_plan(memory, queries.shape[0], count)
  layout = memory.index._layout  # pylint: disable=protected-access
  replicated = mesh_lib.replicated(memory.index.mesh)
  num_keys = jax.device_put(np.int32(memory.size), replicated)
  placed = [jax.device_put(layout.queries(queries[start:start + chunk], chunk), replicated)
            for start in range(0, queries.shape[0], chunk)]
  jax.block_until_ready(placed)
  seconds = _best_seconds(lambda: [fn(part, num_keys, layout.keys) for part in placed], repeats)
  return seconds, passes


def run_search(sizes: Sizes, peaks: dict, log: Callable[[str], None] = print) -> dict:
  from resmem_jax.memory import build_memory  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory.exact import RERANK_MARGIN  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory.tuning import best_of, recall_at_k  # pylint: disable=g-import-not-at-top
  n, d, q, k = sizes.search_keys, sizes.search_dim, sizes.search_queries, sizes.k
  keys, queries = clustered_points(n, d, num_queries=q, seed=0)
  residuals = np.zeros((n, 1), np.float32)  # the search's cost does not depend on them
  count = jax.local_device_count()
  out: dict[str, Any] = {"num_keys": n, "dim": d, "num_queries": q, "k": k,
                         "num_devices": count, "peak_tflops": peaks["float32_highest_tflops"],
                         "hbm_gbps": peaks["hbm_gbps"]}
  reference = None
  for backend in ("exact", "approx"):
    memory, build_s = best_of(lambda b=backend: build_memory(keys, residuals, backend=b), 1)
    memory.search(queries, k)  # compiles every candidate count the queries need
    (_, found), search_s = best_of(lambda m=memory: m.search(queries, k), sizes.search_repeats)
    device_s, passes = device_search_seconds(memory, queries, min(k + RERANK_MARGIN, n),
                                             sizes.search_repeats)
    bounds = search_bounds(n, d, q, passes, peaks["float32_highest_tflops"], peaks["hbm_gbps"],
                           count)
    if reference is None:
      reference = found
    out[backend] = {"build_s": build_s, "build_rows_per_s": n / build_s,
                    "options": memory.backend_options, "bounds": bounds,
                    "end_to_end": against_bounds(search_s, q, bounds),
                    "device": against_bounds(device_s, q, bounds),
                    "recall": recall_at_k(found, reference)}
    log(f"  {backend}: {q / search_s:,.0f} queries/s end to end, {q / device_s:,.0f} on the "
        f"device alone, recall@{k} {out[backend]['recall']:.4f}")
    del memory
  out["timing_rule"] = ("end_to_end: memory.search (device search, host certification, host "
                        "re-rank); device: the jitted first-pass candidate search alone, queries "
                        "already on the device. Fastest of the repeats after a compiling call.")
  return out


# ----------------------------------------------------------------------------- the jobs


@contextlib.contextmanager
def _timed_calls(module, name: str) -> Iterator[list[float]]:
  """Seconds of every call of ``module.name`` made inside the block (the job logs its memory
  build time but returns it nowhere; timing the call keeps the figure the job's own)."""
  original = getattr(module, name)
  seconds: list[float] = []

  def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
      return original(*args, **kwargs)
    finally:
      seconds.append(time.perf_counter() - start)

  setattr(module, name, timed)
  try:
    yield seconds
  finally:
    setattr(module, name, original)


def job_config(name: str, variant: str, sizes: Sizes, datasets_dir: str | None,
               tfds_dir: str | None):
  """The packaged config ``name:variant``, run as is at full size (``data.manual_dir`` from
  ``datasets_dir/<name>`` when given), shortened for TFDS mock data at tiny size."""
  import importlib  # pylint: disable=g-import-not-at-top
  cfg = importlib.import_module(f"resmem_jax.configs.{name}").get_config(variant)
  if tfds_dir is not None:
    cfg.data.data_dir = tfds_dir
  if sizes.mock_examples is None:
    if datasets_dir is not None:
      cfg.data.manual_dir = str(pathlib.Path(datasets_dir) / name)
    return cfg
  cfg.train.num_steps = sizes.job_steps
  cfg.train.batch_size = 16
  cfg.train.eval_batch_size = 64
  cfg.resmem.eval_batch_size = 64
  cfg.resmem.timing_repeats = 1
  return cfg


def run_job(cfg, workdir: pathlib.Path, mock_examples: int | None) -> tuple[dict, dict]:
  """Runs one job into a fresh ``workdir``: ``(its figures, results.json)``. The data set is
  prepared (or found prepared) first so that the job's wall time is its own."""
  from resmem_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax import fitting  # pylint: disable=g-import-not-at-top
  from resmem_jax import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax.jobs import engine  # pylint: disable=g-import-not-at-top
  settings = settings_lib.from_config(cfg)
  with contextlib.ExitStack() as scope:
    if mock_examples is not None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      scope.enter_context(tfds.testing.mock_data(num_examples=mock_examples))
    start = time.perf_counter()
    data_lib.get_dataset(settings.data).num_examples("train")
    prepare_s = time.perf_counter() - start
    with _timed_calls(fitting, "build_memory") as build_s:
      start = time.perf_counter()
      results = engine.run(settings, workdir, progress=False)
      wall_s = time.perf_counter() - start
  rows, timing = results["num_rows"], results["timing"]
  figures = {
      "dataset": results["dataset"], "model": results["model"],
      "num_params": results["num_params"], "data": "tfds mock" if mock_examples else "real",
      "prepare_s": prepare_s, "wall_s": wall_s, "num_rows": rows,
      "training_steps": results["checkpoint_step"],
      "base_test_accuracy": results["base"]["test_accuracy"],
      "resmem_test_accuracy": results["resmem"]["test_accuracy"],
      "k": results["hparams"]["k"], "backend": results["memory"]["backend"],
      "memory_build_s": sum(build_s),
      "memory_build_rows_per_s": rows["train"] / sum(build_s) if build_s else None,
      "test_query_rows_per_s": rows["test"] / timing["resmem_query_and_combine_seconds"],
      "resmem_over_base": timing["resmem_over_base"],
  }
  if "knnlm" in results:
    figures["knnlm_test_accuracy"] = results["knnlm"]["test_accuracy"]
  return figures, results


def run_mnist(sizes: Sizes, workdir: pathlib.Path, datasets_dir: str | None = None,
              tfds_dir: str | None = None, log: Callable[[str], None] = print) -> dict:
  cfg = job_config("mnist", "small_mlp", sizes, datasets_dir, tfds_dir)
  figures, _ = run_job(cfg, workdir, sizes.mock_examples)
  figures["config"] = "mnist:small_mlp"
  log(f"  wall {figures['wall_s']:.1f} s, test accuracy base {figures['base_test_accuracy']:.4f}"
      f" ResMem {figures['resmem_test_accuracy']:.4f}")
  return figures


def run_shakespeare(sizes: Sizes, workdir: pathlib.Path, datasets_dir: str | None = None,
                    tfds_dir: str | None = None, backend: str | None = None,
                    log: Callable[[str], None] = print) -> dict:
  from resmem_jax.jobs import engine  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import load_memory  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory.tuning import best_of  # pylint: disable=g-import-not-at-top
  variant = "tiny" if sizes.mock_examples is not None else ""
  cfg = job_config("tiny_shakespeare", variant, sizes, datasets_dir, tfds_dir)
  if backend:
    cfg.resmem.backend = backend
  figures, _ = run_job(cfg, workdir, sizes.mock_examples)
  figures["config"] = "tiny_shakespeare" + (f":{variant}" if variant else "")
  # memory.search alone on the saved memory, at the chosen k, its own keys as queries.
  memory = load_memory(workdir / engine.UNIT_DIR / engine.INDEX_DIR)
  queries = memory.keys[:min(memory.size, sizes.search_queries)]
  memory.search(queries, figures["k"])
  _, seconds = best_of(lambda: memory.search(queries, figures["k"]), sizes.search_repeats)
  figures["search_queries_per_s"] = len(queries) / seconds
  figures["search_rule"] = "memory.search alone on the saved memory, stored keys as queries"
  log(f"  memory build {figures['memory_build_rows_per_s']:,.0f} rows/s, test queries "
      f"{figures['test_query_rows_per_s']:,.0f} rows/s, search {figures['search_queries_per_s']:,.0f}"
      " queries/s")
  return figures


# ----------------------------------------------------------------------------- the run


def goals(result: dict) -> dict:
  """The issue's H100 goals, checked on this run's figures (None where a section is missing)."""
  sections = result["sections"]
  train, search = sections.get("train", {}), sections.get("search", {})
  resnet50 = [r for r in train.get("rows", [])
              if r["model"] == "resnet50" and r["dtype"] == "bfloat16" and "mfu" in r]
  out: dict[str, bool | None] = {
      "resnet50_bfloat16_mfu_at_least_0.40": (resnet50[0]["mfu"] >= 0.40) if resnet50 else None,
      "exact_end_to_end_at_least_half_flop_bound": None,
      "approx_faster_than_exact_at_recall_0.95": None,
  }
  if "exact" in search and "approx" in search:
    exact, approx = search["exact"], search["approx"]
    out["exact_end_to_end_at_least_half_flop_bound"] = (
        exact["end_to_end"]["fraction_of_flop_bound"] >= 0.5)
    out["approx_faster_than_exact_at_recall_0.95"] = (
        approx["end_to_end"]["seconds"] < exact["end_to_end"]["seconds"]
        and approx["recall"] >= 0.95)
  return out


def failures(result: dict) -> list[str]:
  """What failed: ``"section: error"`` per failed section and per failed training step."""
  out = []
  for name, figures in result["sections"].items():
    if "error" in figures:
      out.append(f"{name}: {figures['error']}")
    for row in figures.get("rows", []):
      if "error" in row:
        out.append(f"{name} {row['model']} {row['dtype']}: {row['error']}")
  return out


def _versions() -> dict:
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__}


def _json_ready(value):
  """NaN and infinities as None (strict JSON), NumPy scalars as Python numbers."""
  if isinstance(value, dict):
    return {str(k): _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def run(sections: Sequence[str] = SECTIONS, size: str = "full", out: str | None = None,
        workdir: str | None = None, datasets_dir: str | None = None, tfds_dir: str | None = None,
        shakespeare_backend: str | None = None, sizes: Sizes | None = None,
        log: Callable[[str], None] = print) -> dict:
  """Measures the default devices; returns the result, writes it to ``out`` (JSON) if given and
  logs the table.

  ``workdir``: where the jobs' workdirs go (each a fresh folder; default a temporary folder,
  removed after). ``datasets_dir``: folder of the TFDS archives (``mnist/``,
  ``tiny_shakespeare/``) for the full-size jobs (default: TFDS downloads). ``tfds_dir``: TFDS's
  ``data_dir`` (default: TFDS's own at full size, inside the workdir at tiny size).
  ``shakespeare_backend``: the tiny_shakespeare job's memory backend (default: the config's).
  ``sizes`` overrides ``size``'s :data:`SIZES`.
  """
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise ValueError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
  if sizes is None:
    if size not in SIZES:
      raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    sizes = SIZES[size]
  started = time.perf_counter()
  devices = jax.devices()
  device = {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "count": len(devices)}
  log(f"device: {device['count']} x {device['device_kind']} ({device['platform']}); measuring "
      "the matmul and read bandwidth")
  matmul_size = sizes.matmul_size
  if device["platform"] == "cpu":
    matmul_size = min(matmul_size, CPU_MATMUL_SIZE)
  peaks = device_peaks(device["device_kind"], measure_peaks(matmul_size, sizes.bandwidth_mb))
  result: dict[str, Any] = {"schema": SCHEMA_VERSION, "size": size, **_versions(),
                            "device": device, "peaks": peaks, "sizes": dataclasses.asdict(sizes),
                            "sections": {}}
  with contextlib.ExitStack() as scope:
    if workdir is None:
      root = pathlib.Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="accel-")))
    else:
      root = pathlib.Path(workdir)
      root.mkdir(parents=True, exist_ok=True)

    def job_dir(name: str) -> pathlib.Path:
      return pathlib.Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))

    if tfds_dir is None and sizes.mock_examples is not None:
      tfds_dir = str(root / "tfds-mock")
    runners = {
        "train": lambda: run_train(sizes, peaks, log),
        "search": lambda: run_search(sizes, peaks, log),
        "mnist": lambda: run_mnist(sizes, job_dir("mnist"), datasets_dir, tfds_dir, log),
        "shakespeare": lambda: run_shakespeare(sizes, job_dir("shakespeare"), datasets_dir,
                                               tfds_dir, shakespeare_backend, log),
    }
    for name in SECTIONS:
      if name not in sections:
        continue
      log(f"{name}:")
      start = time.perf_counter()
      try:
        figures = runners[name]()
      except Exception as err:  # pylint: disable=broad-except  # one failed section ends no run
        figures = {"error": f"{type(err).__name__}: {err}"}
        log(f"  failed: {figures['error']}")
      figures["section_s"] = time.perf_counter() - start
      result["sections"][name] = figures
  result["goals"] = goals(result)
  result["wall_s"] = time.perf_counter() - started
  result = _json_ready(result)
  if out is not None:
    jsonio.write_json_atomic(out, result)
  log(format_table(result))
  if out is not None:
    log(f"written: {out}")
  return result


# ----------------------------------------------------------------------------- the table


def _num(value, spec: str = ".3g") -> str:
  return "-" if value is None else format(value, spec)


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:.1f}%"


def format_table(result: dict) -> str:
  """The run as a readable table (from the JSON dictionary :func:`run` returns)."""
  device, peaks = result["device"], result["peaks"]
  lines = [
      f"{device['count']} x {device['device_kind']} ({device['platform']}), jax "
      f"{result['jax']}, size {result['size']}, {result['wall_s']:.0f} s",
      f"peaks per chip ({peaks['source']}): bfloat16 {_num(peaks['bfloat16_tflops'])}, float32 "
      f"{_num(peaks['float32_tflops'])}, float32 HIGHEST {_num(peaks['float32_highest_tflops'])}"
      f" TFLOP/s; {_num(peaks['hbm_gbps'], '.4g')} GB/s ({peaks['bandwidth_source']})",
  ]
  measured = peaks["measured"]
  lines.append(f"measured: matmul {measured['matmul_size']}^3 bfloat16 "
               f"{_num(measured['bfloat16_tflops'])}, float32 {_num(measured['float32_tflops'])},"
               f" HIGHEST {_num(measured['float32_highest_tflops'])} TFLOP/s; read "
               f"{_num(measured['read_gbps'], '.4g')} GB/s")
  sections = result["sections"]
  for name, figures in sections.items():
    lines.append("")
    if "error" in figures:
      lines.append(f"{name}: FAILED {figures['error']}")
      continue
    lines.extend(_SECTION_FORMATS[name](figures))
    lines.append(f"  ({figures['section_s']:.0f} s)")
  lines.append("")
  lines.append("goals (set for an H100): " + ", ".join(f"{k} {v}" for k, v in result["goals"].items()))
  return "\n".join(lines)


def _train_lines(figures: dict) -> list[str]:
  lines = [f"{'train step':<26} {'batch':>6} {'ms/step':>9} {'images/s':>10} {'TFLOP/s':>8} "
           f"{'MFU':>7} {'MFU xla':>8} {'compile s':>9}"]
  for r in figures["rows"]:
    if "error" in r:
      lines.append(f"{r['model'] + ' ' + r['dtype']:<26} {r['batch_size']:>6} FAILED {r['error']}")
      continue
    lines.append(f"{r['model'] + ' ' + r['dtype']:<26} {r['batch_size']:>6} {r['step_ms']:>9.2f} "
                 f"{r['images_per_s']:>10.0f} {r['achieved_tflops']:>8.3g} {_pct(r['mfu']):>7} "
                 f"{_pct(r['mfu_xla']):>8} {r['compile_s']:>9.1f}")
  return lines


def _search_lines(figures: dict) -> list[str]:
  lines = [f"search {figures['num_keys']:,} x {figures['dim']}, {figures['num_queries']:,} "
           f"queries, k={figures['k']}",
           f"{'  backend, timed':<26} {'queries/s':>11} {'of FLOP':>8} {'of bandw.':>9} "
           f"{'recall':>7} {'build s':>8}"]
  for backend in ("exact", "approx"):
    if backend not in figures:
      continue
    b = figures[backend]
    for timed in ("end_to_end", "device"):
      t = b[timed]
      lines.append(f"  {backend + ', ' + timed.replace('_', ' '):<24} "
                   f"{t['queries_per_s']:>11,.0f} {_pct(t['fraction_of_flop_bound']):>8} "
                   f"{_pct(t['fraction_of_bandwidth_bound']):>9} {b['recall']:>7.4f} "
                   f"{b['build_s']:>8.2f}")
  for backend in ("exact", "approx"):
    if backend in figures:
      bounds = figures[backend]["bounds"]
      lines.append(f"  {backend} bounds: FLOP {1e3 * bounds['flop_bound_s']:.3g} ms at "
                   f"{_num(figures['peak_tflops'])} TFLOP/s, bandwidth "
                   f"{1e3 * bounds['bandwidth_bound_s']:.3g} ms (passes over the keys: "
                   f"{bounds['key_passes']})")
  return lines


def _job_lines(figures: dict) -> list[str]:
  rows = figures["num_rows"]
  line = [f"{figures['config']} ({figures['data']} data): wall {figures['wall_s']:.1f} s "
          f"(+ {figures['prepare_s']:.1f} s data), {figures['training_steps']} steps, "
          f"{rows['train']:,} train / {rows['test']:,} test rows",
          f"  test accuracy: base {figures['base_test_accuracy']:.4f}, ResMem "
          f"{figures['resmem_test_accuracy']:.4f}"
          + (f", kNN-LM {figures['knnlm_test_accuracy']:.4f}" if "knnlm_test_accuracy" in figures
             else "") + f" (k={figures['k']}, {figures['backend']})",
          f"  memory build {_num(figures['memory_build_rows_per_s'], ',.0f')} rows/s "
          f"({figures['memory_build_s']:.2f} s), test query + combine "
          f"{figures['test_query_rows_per_s']:,.0f} rows/s"]
  if "search_queries_per_s" in figures:
    line.append(f"  memory.search alone {figures['search_queries_per_s']:,.0f} queries/s")
  return line


_SECTION_FORMATS: dict[str, Callable[[dict], list[str]]] = {
    "train": _train_lines, "search": _search_lines, "mnist": _job_lines,
    "shakespeare": _job_lines}
