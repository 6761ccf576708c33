"""ResMem fitted around a trained base model: passes, memory, choice on validation, prediction.

    passes = fitting.Passes(dataset, base_model, batch_size, progress)
    memory, choice, tuning = fitting.build_and_select(resmem_settings, passes, "digits")
    predictions = fitting.predict_rows(memory, choice, chunk)
    scores = fitting.evaluate(passes, memory, choice, "test", timing_repeats=3)

1. The memory: one inference pass over the training split gives the keys and, at each candidate
   temperature, the residual rows already in the store's format; one index is built over the keys.
2. k, sigma, T (and kNN-LM's lambda) are chosen on the validation split from one neighbour query
   per row at the largest k; the memory then keeps the rows at the chosen T (same index).
3. Prediction (:func:`predict_rows`) is the one path behind evaluation, timing and ``api.py``.

This is the library both ``api.py`` (your own model and arrays) and ``jobs/engine.py`` (a workdir:
training, saved memory units, results.json) are built on; it reads and writes no files. Rows are
cut by the eval batches' mask (``inference.py``), so images and tokens take the same path.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, TypeVar

import jax
import numpy as np

from resmem_jax import inference
from resmem_jax import mesh as mesh_lib
from resmem_jax import resmem as resmem_lib
from resmem_jax import settings as settings_lib
from resmem_jax.core import gate
from resmem_jax.core import metrics
from resmem_jax.core import predictor
from resmem_jax.core import selection

if TYPE_CHECKING:
  from resmem_jax.data.base import DataSource
  from resmem_jax.memory.protocol import ResidualMemory

# Floats of one chunk's vocabulary-wide arrays (logits, predictions) held at once: 2^26 is 256 MB.
CHUNK_ELEMENTS = 1 << 26
# One line per phase (the tools print them; in a notebook: logging.getLogger("resmem_jax")).
log = logging.getLogger("resmem_jax")
HEADS = ("base", "resmem", "knnlm")

_T = TypeVar("_T")


def _present(value: _T | None, what: str) -> _T:
  """``value``, which the caller knows is set (RuntimeError naming ``what`` should it be None)."""
  if value is None:
    raise RuntimeError(f"{what} is None where a value is required")
  return value


@dataclasses.dataclass
class BaseModel:
  """The trained base network, placed on the mesh."""
  apply_fn: Callable  # (variables, inputs) -> (logits, embedding)
  variables: Any
  step: int
  digest: str  # sha256 of the variables' content: what the memory is keyed by
  num_params: int
  num_classes: int
  compiler_options: dict | None = None  # of its jitted forward pass (compiler_options.py)


# ----------------------------------------------------------------------------- the choice


@dataclasses.dataclass(frozen=True)
class ResMemChoice:
  """ResMem's hyperparameters and, when chosen on validation, the choice's validation scores."""
  k: int
  sigma: float  # absolute (a relative grid's point times Choice.sigma_scale)
  temperature: float
  base_mix: float  # the probability output's mix with the base (predictor.resmem_probabilities)
  validation_accuracy: float | None = None  # None: fixed in the settings, not scored
  validation_squared_loss: float | None = None
  validation_log_loss: float | None = None


@dataclasses.dataclass(frozen=True)
class KnnLmChoice:
  """kNN-LM's hyperparameters (saved as ``lambda``, a Python keyword) and validation scores."""
  k: int
  sigma: float
  temperature: float
  knn_lambda: float
  validation_accuracy: float | None = None
  validation_squared_loss: float | None = None
  validation_log_loss: float | None = None


@dataclasses.dataclass
class Choice:
  """The chosen hyperparameters and how they were chosen (saved with the memory)."""
  resmem: ResMemChoice
  knnlm: KnnLmChoice | None
  chosen_on: str                  # "validation" or "fixed"
  sigma_scale: float | None       # the unit of a relative sigma grid
  validation_base: dict | None    # the base model's validation scores
  validation_rows: int
  grid: list                      # every grid point's validation scores
  gate: dict | None = None        # the opt-in gate's decision (core/gate.py), None when off

  def to_json(self) -> dict:
    """The JSON form every saved choice has (the workdir's memory unit, ``ResMem.save``)."""
    out = dataclasses.asdict(self)
    if self.knnlm is not None:
      out["knnlm"]["lambda"] = out["knnlm"].pop("knn_lambda")
    return out

  @classmethod
  def from_json(cls, d: dict) -> Choice:
    """The choice :meth:`to_json` wrote (ValueError for anything else). Saves of a fixed choice
    written before its validation scores were typed lack them: they are None, as written now."""
    try:
      fields = dict(d)
      knn = fields.pop("knnlm")
      if knn is not None:
        knn = dict(knn)
        knn = KnnLmChoice(knn_lambda=knn.pop("lambda"), **knn)
      return cls(resmem=ResMemChoice(**fields.pop("resmem")), knnlm=knn, **fields)
    except (KeyError, TypeError) as err:
      raise ValueError(f"not a saved ResMem choice ({type(err).__name__}: {err})") from None


def fixed_choice(r: settings_lib.ResMemSettings) -> Choice:
  """The choice of settings that fix every hyperparameter (``settings.needs_validation`` False)."""
  if r.k is None or r.sigma is None or r.temperature is None or r.base_mix is None:
    raise ValueError("a fixed choice needs resmem.k, sigma, temperature and base_mix set")
  knn = None
  if r.knnlm:
    if r.knn_lambda is None:
      raise ValueError("a fixed kNN-LM choice needs resmem.knn_lambda set")
    knn = KnnLmChoice(k=r.k, sigma=r.sigma, temperature=r.temperature, knn_lambda=r.knn_lambda)
  return Choice(resmem=ResMemChoice(k=r.k, sigma=r.sigma, temperature=r.temperature,
                                    base_mix=r.base_mix), knnlm=knn,
                chosen_on="fixed", sigma_scale=None, validation_base=None, validation_rows=0,
                grid=[])


def gate_sentence(block: dict) -> str:
  """The gate's decision in one line (the log and the printed table)."""
  held = block["held_out"]
  if block["select_by"] == "accuracy":
    show = lambda x: f"{100 * x:+.2f}"
    unit = " points"
  else:
    show = lambda x: f"{x:+.4f}"
    unit = ""
  low, high = held["ci95"]
  return (f"{'memorize' if block['memorize'] else 'decline'} at alpha = {block['alpha']:g}: on "
          f"{held['rows']:,} held-out validation rows ResMem's {block['select_by']} gain over the "
          f"base at its best temperature (T = {block['comparator']['temperature']:g}) is "
          f"{show(held['gain'])}{unit} (95% CI {show(low)} to {show(high)}), one-sided "
          f"{metrics.format_p(held['p_value'])}")


# ----------------------------------------------------------------------------- passes


class Passes:
  """Inference passes of the base model over the data set's splits.

  ``fold_block``: rows per example (1 for images, a sequence's tokens for text); the validation
  folds and the gate's test units are made of whole blocks.
  """

  def __init__(self, dataset: DataSource, model: BaseModel, batch_size: int, progress: bool,
               fold_block: int = 1):
    self.dataset = dataset
    self.model = model
    self.fold_block = int(fold_block)
    self.mesh = mesh_lib.data_mesh()
    self.batch_size = mesh_lib.pad_to_multiple(int(batch_size), mesh_lib.num_data_shards(self.mesh))
    self.progress = progress

  def forward(self, **kwargs) -> inference.Forward:
    return inference.make_forward(self.model.apply_fn, self.mesh,
                                  compiler_options=self.model.compiler_options, **kwargs)

  def rows(self, split: str, forward: inference.Forward,
           local: bool = False) -> Iterator[inference.Rows]:
    """The split's rows, all of them on every process (or, ``local``, this process's own)."""
    batches = self.dataset.eval_batches(split, self.batch_size)
    examples = self.dataset.num_examples(split)  # None: an iterable of unknown length
    total = None if examples is None else -(-examples // self.batch_size)
    return inference.run_pass(forward, self.model.variables, batches, self.mesh, desc=split,
                              total_batches=total, progress=self.progress, local=local)


def rows_per_example(info) -> int:
  """Rows one example gives: a row per token of a text sequence, one per image."""
  return int(np.prod(info.input_shape)) if info.input_dtype == "int32" else 1


def chunk_rows(num_classes: int, low: int = 256, high: int = 65536) -> int:
  """Rows per chunk so that a chunk's ``[rows, C]`` arrays stay near CHUNK_ELEMENTS floats."""
  return int(min(high, max(low, CHUNK_ELEMENTS // max(1, num_classes))))


# ----------------------------------------------------------------------------- memory + selection


def temperatures(r: settings_lib.ResMemSettings) -> tuple[float, ...]:
  """The candidate temperatures: the fixed one, else the grid."""
  return (r.temperature,) if r.temperature is not None else tuple(r.temperature_grid)


def across_hosts(r: settings_lib.ResMemSettings) -> bool:
  """Whether the memory is split across processes (each holds and saves its own rows)."""
  return r.memory_across_hosts and jax.process_count() > 1


def build_memory(r: settings_lib.ResMemSettings, passes: Passes, dataset_name: str):
  """The memory of the training split: ``(memory with the first temperature's residuals,
  {temperature: residual store}, metadata)``; one inference pass gives the keys and the residual
  rows at every candidate temperature, one index serves them all."""
  from resmem_jax import memory as memory_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import store as store_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import hosts  # pylint: disable=g-import-not-at-top
  candidates = temperatures(r)
  start = time.perf_counter()
  split = across_hosts(r)
  forward = passes.forward(with_logits=False, temperatures=candidates,
                           residual_format=r.residual_format, top_m=r.top_m)
  num_classes = passes.model.num_classes
  metadata = {"dataset": dataset_name, "checkpoint_step": passes.model.step,
              "model_digest": passes.model.digest}
  if r.shard_dir:
    keys, stores, labels = _rows_through_shards(r, passes, forward, split, dataset_name)
  else:
    train = inference.concatenate(list(passes.rows("train", forward, local=split)))
    keys, labels = train.embeddings, train.labels
    stores = {t: store_lib.store_from_arrays(arrays, r.residual_format, num_classes, r.top_m)
              for t, arrays in train.residuals.items()}
    del train
  options = memory_lib.parse_backend_options(r.backend_options)
  if split and r.backend == "approx":
    options.setdefault("across_hosts", False)  # each host's part on its own devices
  local = memory_lib.memory_from_store(keys, stores[candidates[0]], r.backend, labels=labels,
                                       metadata=metadata, key_format=r.key_format, **options)
  del keys
  # split: this process's rows only; searches ask every host
  memory: ResidualMemory = hosts.HostShardedMemory(local) if split else local
  log.info("memory: %s rows of dimension %d (%s, %s keys, %s residuals) in %.1f s",
           f"{memory.size:,}", memory.dim, r.backend, r.key_format, r.residual_format,
           time.perf_counter() - start)
  return memory, stores, metadata


def _rows_through_shards(r: settings_lib.ResMemSettings, passes: Passes,
                         forward: inference.Forward, split: bool, dataset_name: str):
  """The training rows written to ``r.shard_dir`` in shards as the pass goes (resuming after the
  shards a killed run completed), then read back coded: ``(KeyStore, {T: store}, labels)``."""
  from resmem_jax.memory import shards  # pylint: disable=g-import-not-at-top
  candidates = temperatures(r)
  folder = r.shard_dir
  if split:  # each process writes and reads its own rows
    folder = os.path.join(folder, f"process-{jax.process_index()}")
  rows_per_batch = passes.batch_size * passes.fold_block  # fold_block: rows per example
  batches_per_shard = max(1, -(-int(r.shard_rows) // rows_per_batch))
  spec = {"dataset": dataset_name, "model_digest": passes.model.digest,
          "temperatures": [float(t) for t in candidates], "residual_format": r.residual_format,
          "top_m": r.top_m, "batch_size": passes.batch_size, "batches_per_shard": batches_per_shard,
          "process": [jax.process_index(), jax.process_count()] if split else None}
  done = len(shards.prepare(folder, spec))
  if done:
    log.info("memory rows: resuming after %d complete shards in %s", done, folder)
  batches = passes.dataset.eval_batches("train", passes.batch_size)
  batches = itertools.islice(batches, done * batches_per_shard, None)
  examples = passes.dataset.num_examples("train")
  total = None if examples is None else max(0, -(-examples // passes.batch_size)
                                            - done * batches_per_shard)
  parts: list[inference.Rows] = []
  index = done
  names = [f"t{i}" for i in range(len(candidates))]

  def flush():
    nonlocal index
    rows = inference.concatenate(parts)
    shards.write_shard(folder, index, rows.embeddings,
                       {name: rows.residuals[t] for name, t in zip(names, candidates, strict=True)},
                       rows.labels)
    parts.clear()
    index += 1

  for count, rows in enumerate(inference.run_pass(
      forward, passes.model.variables, batches, passes.mesh, desc="train", total_batches=total,
      progress=passes.progress, local=split), 1):
    parts.append(rows)
    if count % batches_per_shard == 0:
      flush()
  if parts:
    flush()
  key_store, by_name, labels = shards.read_stores(
      folder, num_outputs=passes.model.num_classes, key_format=r.key_format,
      residual_format=r.residual_format, top_m=r.top_m, temperatures=names)
  return key_store, {t: by_name[name] for name, t in zip(names, candidates, strict=True)}, labels


def build_and_select(r: settings_lib.ResMemSettings, passes: Passes, dataset_name: str):
  """The memory at the chosen temperature, the choice, and the ScaNN query tuning (or None)."""
  memory, stores, metadata = build_memory(r, passes, dataset_name)
  start = time.perf_counter()
  if settings_lib.needs_validation(r):
    by_temperature = {t: memory.with_store(store) for t, store in stores.items()}
    choice, validation_queries = select_on_validation(r, passes, memory, by_temperature)
  else:
    choice, validation_queries = fixed_choice(r), None
  res = choice.resmem
  memory = memory.with_store(stores[res.temperature],
                             metadata=dict(metadata, temperature=res.temperature))
  chosen = f"k={res.k} sigma={res.sigma:.4g} T={res.temperature:g} base_mix={res.base_mix:g}"
  how = (f"chosen on {choice.validation_rows:,} validation rows" if choice.chosen_on == "validation"
         else "fixed in the config")
  log.info("selection: %s, %s in %.1f s", chosen, how, time.perf_counter() - start)
  if choice.gate is not None:
    log.info("gate (opt-in): %s", gate_sentence(choice.gate))
  tuning = None
  if r.tune_recall is not None:
    # ScaNN's query settings on the real query distribution (validation embeddings) at the
    # chosen k: the fastest reaching recall@k >= tune_recall against exact search.
    tuning = memory.tune_search(validation_queries, int(res.k), r.tune_recall)
    tuning.pop("tried", None)
    log.info("memory: ScaNN query settings tuned on validation: %s leaves, reorder %s, recall@%s "
             "%.3f", tuning["leaves_to_search"], tuning["reorder"], res.k, tuning["recall"])
  return memory, choice, tuning


def sigma_scale(nearest_distances: np.ndarray) -> float:
  """The unit of a relative sigma grid: the median distance from a validation row to its
  nearest memory key (the median positive distance if that is 0, else 1)."""
  nearest = np.asarray(nearest_distances, np.float64)
  scale = float(np.median(nearest)) if nearest.size else 1.0
  if not math.isfinite(scale) or scale <= 0:
    positive = nearest[nearest > 0]
    scale = float(np.median(positive)) if positive.size else 1.0
  return scale


def _validation_chunks(r: settings_lib.ResMemSettings, passes: Passes) -> Iterator[inference.Rows]:
  return inference.rechunk(passes.rows("validation", passes.forward(with_logits=True)),
                           chunk_rows(passes.model.num_classes), limit=r.max_validation_rows)


def validation_sweep(r: settings_lib.ResMemSettings, passes: Passes, memory: ResidualMemory,
                     by_temperature: dict):
  """Streams the validation rows through the selection sweep (``by_temperature``: the memory with
  each temperature's residuals). Returns the sweep, the sigma grid's unit (or None) and the first
  chunk's embeddings (the queries ScaNN's settings are tuned on)."""
  num_classes = passes.model.num_classes
  k_grid = (r.k,) if r.k is not None else tuple(k for k in r.k_grid if k <= memory.size)
  if not k_grid:
    raise ValueError(f"resmem.k_grid {r.k_grid} has no k <= the {memory.size} memory rows")
  if r.k is not None and r.k > memory.size:
    raise ValueError(f"resmem.k={r.k} is larger than the memory ({memory.size} rows)")
  k_max = max(k_grid)
  lambda_grid = None
  if r.knnlm:
    lambda_grid = (r.knn_lambda,) if r.knn_lambda is not None else r.knn_lambda_grid
  sweep, scale, tuning_queries = None, None, None
  sigma_grid: tuple[float, ...]
  for chunk in _validation_chunks(r, passes):
    if sweep is None:
      tuning_queries = chunk.embeddings
      if r.tune_recall is not None:
        # The selection query runs at the largest k: meet the recall target there too, so the
        # choice is made on neighbours as good as the ones served.
        tuned = memory.tune_search(chunk.embeddings, k_max, r.tune_recall)
        log.debug("ScaNN settings for the k=%d selection query: leaves %s, reorder %s, "
                  "recall %.4f", k_max, tuned["leaves_to_search"], tuned["reorder"],
                  tuned["recall"])
      distances, ids = memory.search(chunk.embeddings, k_max)
      if r.sigma is not None:
        sigma_grid, scale = (r.sigma,), None
      elif r.sigma_relative:
        # Embedding distances have no natural unit: the grid is in multiples of the median
        # nearest-neighbour distance of the first chunk (all of it unless the split is huge).
        scale = sigma_scale(distances[:, 0])
        sigma_grid = tuple(s * scale for s in r.sigma_grid)
      else:
        sigma_grid, scale = tuple(r.sigma_grid), None
      sweep = selection.SelectionSweep(
          k_grid=k_grid, sigma_grid=sigma_grid, temperature_grid=temperatures(r),
          num_classes=num_classes,
          mix_grid=(r.base_mix,) if r.base_mix is not None else r.base_mix_grid,
          lambda_grid=lambda_grid, fold_block=passes.fold_block)
    else:
      distances, ids = memory.search(chunk.embeddings, k_max)
    sweep.add(distances, ids, chunk.logits, chunk.labels,
              lambda t, nb: by_temperature[t].residual_rows(nb),
              neighbour_labels=None if lambda_grid is None else memory.labels_of(ids))
  if sweep is None:
    raise ValueError("the validation split produced no rows")
  return sweep, scale, tuning_queries


def select_on_validation(r: settings_lib.ResMemSettings, passes: Passes, memory: ResidualMemory,
                         by_temperature: dict):
  """ResMem's (and kNN-LM's) choice on the validation split, and the gate's decision when asked.

  Returns the choice and the first chunk's embeddings (the queries ScaNN's settings are tuned on).
  """
  sweep, scale, tuning_queries = validation_sweep(r, passes, memory, by_temperature)
  resmem_points, knn_points = sweep.points()
  best = selection.best(resmem_points, r.select_by)
  fixed = r.k is not None and r.sigma is not None and r.temperature is not None
  chosen = ResMemChoice(k=best.k, sigma=best.sigma, temperature=best.temperature,
                        base_mix=_present(best.base_mix, "a ResMem grid point's base_mix"),
                        validation_accuracy=best.accuracy,
                        validation_squared_loss=best.squared_loss,
                        validation_log_loss=best.log_loss)
  knn = None
  if sweep.lambda_grid is not None:
    best_knn = selection.best(knn_points, r.select_by)
    knn = KnnLmChoice(k=best_knn.k, sigma=best_knn.sigma, temperature=best_knn.temperature,
                      knn_lambda=_present(best_knn.knn_lambda, "a kNN-LM grid point's lambda"),
                      validation_accuracy=best_knn.accuracy,
                      validation_squared_loss=best_knn.squared_loss,
                      validation_log_loss=best_knn.log_loss)
  gate_block = (gate_on_validation(r, passes, by_temperature, sweep)
                if r.gate_alpha is not None else None)
  log.debug("chosen on %d validation rows: ResMem %s; kNN-LM %s", sweep.count, chosen, knn)
  return Choice(resmem=chosen, knnlm=knn, chosen_on="fixed" if fixed else "validation",
                sigma_scale=scale, validation_base=sweep.base_scores(),
                validation_rows=sweep.count,
                grid=[dataclasses.asdict(p) for p in resmem_points + knn_points],
                gate=gate_block), tuning_queries


def gate_on_validation(r: settings_lib.ResMemSettings, passes: Passes, by_temperature: dict,
                       sweep: selection.SelectionSweep) -> dict:
  """The opt-in gate (``core/gate.py``): the choice on the sweep's fold 0, then a second pass over
  the validation rows scores that choice and the comparator on fold 1's rows."""
  half = gate.choose_on_selection_half(sweep, r.select_by)
  memory = by_temperature[half.point.temperature]
  parts: dict[str, list] = {"resmem": [], "comparator": [], "units": []}
  seen = 0
  for chunk in _validation_chunks(r, passes):
    index = seen + np.arange(chunk.size)
    seen += chunk.size
    test = selection.fold_of(index, sweep.fold_block) == 1
    if not test.any():
      continue
    distances, ids = memory.search(chunk.embeddings, int(half.point.k))
    values, columns = memory.residual_rows(ids)
    resmem, comparator = gate.score_rows(half, chunk.logits, chunk.labels, distances, values,
                                         columns)
    parts["resmem"].append({n: v[test] for n, v in resmem.items()})
    parts["comparator"].append({n: v[test] for n, v in comparator.items()})
    parts["units"].append(index[test] // sweep.fold_block)
  if not parts["units"]:
    raise ValueError("resmem.gate_alpha: the validation split has no rows in the gate's test half "
                     "(it needs at least two units of rows); give more validation rows or unset "
                     "resmem.gate_alpha")
  joined = {name: {n: np.concatenate([p[n] for p in parts[name]]) for n in parts[name][0]}
            for name in ("resmem", "comparator")}
  test = gate.held_out_test(joined["resmem"], joined["comparator"],
                            np.concatenate(parts["units"]), r.select_by)
  return gate.decision(_present(r.gate_alpha, "resmem.gate_alpha"), r.select_by, half, test)


# ----------------------------------------------------------------------------- prediction


_base_prediction = jax.jit(predictor.base_prediction)
_probabilities = jax.jit(predictor.resmem_probabilities)


@jax.jit
def _knnlm(base, distances, sigma, neighbour_labels, lam):
  weights = predictor.neighbour_weights(distances, sigma)
  p_knn = predictor.knn_distribution(weights, neighbour_labels, base.shape[-1])
  return predictor.knnlm_mixture(p_knn, base, lam)


class Predictions(NamedTuple):
  """One chunk's predictions, each ``[rows, C]``."""
  base: Any           # the base model's softmax at T = 1
  scores: Any         # ResMem's p + r (its class: the argmax)
  probabilities: Any  # ResMem's probability output
  knnlm: Any          # kNN-LM's mixture, or None


def predict_rows(memory: ResidualMemory, choice: Choice, chunk: inference.Rows, *,
                 knnlm: bool = True) -> Predictions:
  """Base, ResMem (and, when chosen and ``knnlm``, kNN-LM) predictions for one chunk of rows; one
  neighbour query serves both heads."""
  res, knn = choice.resmem, choice.knnlm if knnlm else None
  base_1 = _base_prediction(chunk.logits, np.float32(1.0))
  k = int(res.k)
  k_query = max(k, int(knn.k) if knn else 0)
  distances, ids = memory.search(chunk.embeddings, k_query)
  base_t = _base_prediction(chunk.logits, np.float32(res.temperature))
  scores = resmem_lib.combine(base_t, distances[:, :k], memory.residual_rows(ids[:, :k]),
                              res.sigma)
  probabilities = _probabilities(scores, base_1, np.float32(res.base_mix))
  knn_pred = None
  if knn:
    kk = int(knn.k)
    knn_pred = _knnlm(_base_prediction(chunk.logits, np.float32(knn.temperature)),
                      distances[:, :kk], np.float32(knn.sigma), memory.labels_of(ids[:, :kk]),
                      np.float32(knn.knn_lambda))
  return Predictions(base_1, scores, probabilities, knn_pred)


# ----------------------------------------------------------------------------- evaluation


@jax.jit
def _row_metrics(pred, labels):
  return metrics.per_row(pred, labels)


class _Totals:
  """Per-row metrics of one head, accumulated over chunks."""

  def __init__(self):
    self.parts: dict[str, list[np.ndarray]] = {"hit": [], "squared_loss": [], "log_loss": []}

  def add(self, rows: dict) -> None:
    for name, values in rows.items():
      self.parts[name].append(np.asarray(values, np.float64))

  def summary(self, prefix: str) -> dict:
    values = {name: np.concatenate(parts) if parts else np.zeros(0)
              for name, parts in self.parts.items()}
    n = max(1, values["hit"].size)
    accuracy = float(values["hit"].sum() / n)
    log_loss = float(values["log_loss"].sum() / n)
    return {f"{prefix}_accuracy": accuracy, f"{prefix}_error": 1.0 - accuracy,
            f"{prefix}_squared_loss": float(values["squared_loss"].sum() / n),
            f"{prefix}_log_loss": log_loss, f"{prefix}_perplexity": float(math.exp(log_loss))}

  @property
  def hits(self) -> np.ndarray:
    if not self.parts["hit"]:
      return np.zeros(0, bool)
    return np.concatenate(self.parts["hit"]).astype(bool)


def _eval_chunks(passes: Passes, split: str, forward: inference.Forward
                 ) -> Iterator[inference.Rows]:
  return inference.rechunk(passes.rows(split, forward),
                           chunk_rows(passes.model.num_classes, high=16384))


def evaluate(passes: Passes, memory: ResidualMemory, choice: Choice, split: str, *,
             timing_repeats: int | None = None) -> dict:
  """Base, ResMem (and kNN-LM) metrics on every row of ``split``.

  Returns ``{head: summary}`` plus ``rows``, per-row ``hits`` and, given ``timing_repeats``,
  ``timing``: the base forward pass against ResMem's extra cost, each the fastest of that many
  timed passes after this (compiling) one.
  """
  forward = passes.forward(with_logits=True)  # one jitted program for every pass below
  totals = {head: _Totals() for head in HEADS if head != "knnlm" or choice.knnlm}
  count = 0
  for chunk in _eval_chunks(passes, split, forward):
    out = predict_rows(memory, choice, chunk)
    totals["base"].add(_row_metrics(out.base, chunk.labels))
    # ResMem's class and squared loss are those of p + r, its log loss that of its probabilities.
    totals["resmem"].add(dict(_row_metrics(out.scores, chunk.labels),
                              log_loss=_row_metrics(out.probabilities, chunk.labels)["log_loss"]))
    if out.knnlm is not None:
      totals["knnlm"].add(_row_metrics(out.knnlm, chunk.labels))
    count += chunk.size
  if count == 0:
    raise ValueError(f"the {split} split produced no rows")
  result: dict[str, Any] = {head: t.summary(split) for head, t in totals.items()}
  result["rows"] = count
  result["hits"] = {head: t.hits for head, t in totals.items()}
  if timing_repeats is not None:
    result["timing"] = _time_prediction(passes, memory, choice, split, forward, timing_repeats)
  return result


def _time_prediction(passes: Passes, memory: ResidualMemory, choice: Choice, split: str,
                     forward: inference.Forward, repeats: int) -> dict:
  """Seconds of the base forward pass and of ResMem's extra cost: :func:`predict_rows` without
  kNN-LM (the neighbour query, the combination, the probability output), as evaluation runs it."""
  forward_s, query_s = [], []
  for _ in range(max(1, repeats)):
    spent_forward = spent_query = 0.0
    for chunk in _eval_chunks(passes, split, forward):
      spent_forward += chunk.seconds
      start = time.perf_counter()
      jax.block_until_ready(predict_rows(memory, choice, chunk, knnlm=False))
      spent_query += time.perf_counter() - start
    forward_s.append(spent_forward)
    query_s.append(spent_query)
  forward_best, query_best = min(forward_s), min(query_s)
  return {"base_forward_seconds": forward_best,
          "resmem_query_and_combine_seconds": query_best,
          "resmem_total_seconds": forward_best + query_best,
          "resmem_over_base": (forward_best + query_best) / max(forward_best, 1e-9),
          "timing_repeats": max(1, repeats), "devices": jax.device_count(),
          "platform": jax.devices()[0].platform}
