"""The job engine: one ResMem run for every data set, a row per example (images) or per token (text).

    results = engine.run(settings, workdir)

1. Check the settings and read the data set's shape (seconds, before any training).
2. Train the base model into WORKDIR (or resume / reuse the finished checkpoint there).
3. The memory: one inference pass over the training split gives the keys and, at each candidate
   temperature, the residual rows already in the store's format; one index is built over the keys.
   k, sigma, T (and kNN-LM's lambda) are chosen on the validation split from one neighbour query
   per row at the largest k; the memory then keeps the rows at the chosen T (same index). It is
   saved in WORKDIR/memory and reused by a rerun whose checkpoint, data and memory settings match.
4. Evaluation on the test split (and the training split): base, ResMem (and kNN-LM) side by side,
   and ResMem's prediction time against the base forward pass.
5. WORKDIR/results.json, one schema for every data set (``jobs/report.py`` prints it).

Rows are cut by the eval batches' mask (``inference.py``), so images and tokens take the same path;
what differs is configuration: the residual format (sparse for vocabularies), the kNN-LM head
(``resmem.knnlm``) and whether the training split is evaluated.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from resmem_jax import compiler_options
from resmem_jax import inference
from resmem_jax import jsonio
from resmem_jax import mesh as mesh_lib
from resmem_jax import resmem as resmem_lib
from resmem_jax import settings as settings_lib
from resmem_jax.core import gate
from resmem_jax.core import metrics
from resmem_jax.core import predictor
from resmem_jax.core import selection
from resmem_jax.jobs import report

# Floats of one chunk's vocabulary-wide arrays (logits, predictions) held at once: 2^26 is 256 MB.
CHUNK_ELEMENTS = 1 << 26
# One line per phase (the tools print them; in a notebook: logging.getLogger("resmem_jax")).
log = logging.getLogger("resmem_jax")
MEMORY_DIR = "memory"
STATE_FILE = "resmem.json"
HEADS = ("base", "resmem", "knnlm")


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


@dataclasses.dataclass
class Choice:
  """The chosen hyperparameters and how they were chosen (saved with the memory)."""
  resmem: dict                    # k, sigma, temperature, base_mix (+ validation scores)
  knnlm: dict | None              # k, sigma, temperature, lambda (+ validation scores)
  chosen_on: str                  # "validation" or "fixed"
  sigma_scale: float | None       # the unit of a relative sigma grid
  validation_base: dict | None    # the base model's validation scores
  validation_rows: int
  grid: list                      # every grid point's validation scores
  gate: dict | None = None        # the opt-in gate's decision (core/gate.py), None when off


class Passes:
  """Inference passes of the base model over the data set's splits.

  ``fold_block``: rows per example (1 for images, a sequence's tokens for text); the validation
  folds and the gate's test units are made of whole blocks.
  """

  def __init__(self, dataset, model: BaseModel, batch_size: int, progress: bool,
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


# ----------------------------------------------------------------------------- the run


def run(settings: settings_lib.Settings, workdir: str | os.PathLike, *,
        progress: bool = True, start_over: bool = False) -> dict:
  """Trains (if needed), memorizes, selects, evaluates; writes and returns ``results.json``.

  Everything is checked before any work: the settings, the data set's shape and the workdir's
  record (a model trained with other settings is refused; ``start_over`` moves that run to
  WORKDIR/superseded/ first).
  """
  workdir = pathlib.Path(workdir)
  # The workdir's lock (one writer per workdir), taken once the settings are checked, is held
  # until results.json is written.
  with contextlib.ExitStack() as lock_scope:
    info, trained, passes = trained_passes(settings, workdir, progress=progress,
                                           start_over=start_over, lock_scope=lock_scope)
    model = passes.model
    memory, choice, tuning, reused = _memory(settings, passes, workdir)
    start = time.perf_counter()
    evaluation = evaluate(passes, memory, choice, settings.resmem, "test", timed=True)
    train_eval = (evaluate(passes, memory, choice, settings.resmem, "train", timed=False)
                  if settings.resmem.evaluate_train else None)
    log.info("evaluation: %s in %.1f s", "test and train splits" if train_eval else "test split",
             time.perf_counter() - start)
    results = assemble_results(settings, info, model, memory, choice, tuning, reused,
                               evaluation, train_eval, trained.metrics)
    if jax.process_index() == 0:
      jsonio.write_json_atomic(workdir / "results.json", results)
  return results


def trained_passes(settings: settings_lib.Settings, workdir: pathlib.Path, *, progress: bool,
                   start_over: bool = False, lock_scope: contextlib.ExitStack | None = None):
  """``(data set info, trained model, Passes)``: the settings and data checked, the model trained
  into ``workdir`` (or resumed, or reused when finished). ``lock_scope``: where the workdir's lock
  stays held after training (else it is released when training returns)."""
  from resmem_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax import training  # pylint: disable=g-import-not-at-top

  settings_lib.check(settings)
  mesh_lib.initialize_distributed(settings.train)
  dataset = data_lib.get_dataset(settings.data)
  info = dataset.info
  _check_before_training(settings, dataset)
  sizes = ", ".join(f"{dataset.num_examples(split):,} {split}" for split in ("train", "validation",
                                                                            "test"))
  log.info("data: %s, %s %s, %d %s", info.name, sizes,
           "sequences" if info.input_dtype == "int32" else "examples", info.num_classes,
           "tokens" if info.input_dtype == "int32" else "classes")
  trained = training.train_model(settings, dataset, workdir, start_over=start_over,
                                 progress=progress, lock_scope=lock_scope)
  model = _base_model(trained, info.num_classes, settings.model)
  passes = Passes(dataset, model, settings.resmem.eval_batch_size, progress,
                  fold_block=rows_per_example(info))
  return info, trained, passes


def _check_before_training(settings, dataset) -> None:
  """What can only be checked once the data set's size is known, still before training."""
  r = settings.resmem
  settings_lib.check_against_data(settings, dataset.info)  # k, empty train split, sizes that fit
  if settings_lib.needs_validation(r) and dataset.num_examples("validation") == 0:
    raise settings_lib.SettingsError(
        f"the validation split is empty; {settings_lib.validation_needed_message(r)}")
  if r.tune_recall is not None:
    from resmem_jax import memory as memory_lib  # pylint: disable=g-import-not-at-top
    options = memory_lib.parse_backend_options(r.backend_options)
    size = dataset.num_examples("train")
    if dataset.info.input_dtype == "float32" and not memory_lib.has_query_settings(
        "scann", size, options):
      raise settings_lib.SettingsError(
          f"resmem.tune_recall: a ScaNN memory of {size} keys searches by brute force (exact, "
          "nothing to tune); set resmem.backend_options='mode=tree_ah' (or 'mode=ah') for a "
          "partitioned index, or unset resmem.tune_recall")


def _base_model(trained, num_classes: int,
                model_settings: settings_lib.ModelSettings) -> BaseModel:
  from resmem_jax import models  # pylint: disable=g-import-not-at-top
  module = trained.module
  mesh = mesh_lib.data_mesh()
  return BaseModel(apply_fn=lambda v, x: module.apply(v, x, train=False),
                   variables=mesh_lib.replicate(trained.variables, mesh),
                   step=int(trained.step), digest=trained.digest,
                   num_params=models.count_params(trained.variables),
                   num_classes=int(num_classes),
                   compiler_options=compiler_options.for_model(model_settings, mesh))


# ----------------------------------------------------------------------------- memory + selection


def _temperatures(r: settings_lib.ResMemSettings) -> tuple[float, ...]:
  return (r.temperature,) if r.temperature is not None else tuple(r.temperature_grid)


def memory_signature(settings: settings_lib.Settings, model_digest: str) -> dict:
  """What the saved memory and its choice were made from: the model's content (not its step), the
  rows it holds and every memory / selection setting. A rerun reuses them only when equal."""
  d, r = settings.data, settings.resmem
  return {
      "data": {"name": d.name, "val_fraction": d.val_fraction, "train_fraction": d.train_fraction,
               "split_seed": d.split_seed, "image_size": d.image_size, "seq_len": d.seq_len,
               "max_split_tokens": d.max_split_tokens, "vocab_size": d.vocab_size,
               "vocab_documents": d.vocab_documents},
      "model_digest": model_digest,
      "resmem": settings_lib.json_ready({name: getattr(r, name) for name in (
          "backend", "backend_options", "residual_format", "top_m", "k", "sigma", "temperature",
          "k_grid", "sigma_grid", "sigma_relative", "temperature_grid", "select_by", "base_mix",
          "base_mix_grid", "gate_alpha", "knnlm", "knn_lambda", "knn_lambda_grid",
          "max_validation_rows", "tune_recall")}),
      "gate_rule": gate.GATE_RULE if r.gate_alpha is not None else None,
      "probability_rule": predictor.PROBABILITY_RULE,
      # A memory split across hosts is one part per process: reusable by as many processes only.
      "memory_hosts": jax.process_count() if settings.resmem.memory_across_hosts else 1,
  }


def _memory(settings, passes: Passes, workdir: pathlib.Path):
  """(memory, choice, search tuning, reused): the saved memory when it matches, else built.

  WORKDIR/memory is one unit: the memory (``index/``) and its state (``resmem.json``: the
  signature, the choice and the memory's manifest digest) are written into one folder swapped in
  at once, so a kill at any write leaves the old unit or the new one, and a read checks that the
  memory is the one the state names. A saved unit that cannot be used is a cache: it is set aside
  (never deleted) with a warning and the memory is built again.
  """
  mem_dir = workdir / MEMORY_DIR
  signature = memory_signature(settings, passes.model.digest)
  across_hosts = _across_hosts(settings.resmem)
  saved = _saved_memory(mem_dir, signature, across_hosts)
  if saved is not None:
    log.info("memory: reusing %s (%s rows, its settings and model unchanged)", mem_dir,
             f"{saved[0].size:,}")
    return (*saved, True)
  memory, choice, tuning = build_and_select(settings.resmem, passes, settings.data.name)
  state = {"version": STATE_VERSION, "signature": signature,
           "choice": dataclasses.asdict(choice), "tuning": tuning}
  if across_hosts:
    _save_host_parts(mem_dir, memory, state)
  elif jax.process_index() == 0:
    save_memory_unit(mem_dir, memory, state)
  return memory, choice, tuning, False


def _across_hosts(r: settings_lib.ResMemSettings) -> bool:
  return r.memory_across_hosts and jax.process_count() > 1


# 2: the memory and its state are one folder swapped in as a unit; the state names the memory's
# manifest digest (or, split across hosts, each part's). 1 (no "version"): two separate writes.
STATE_VERSION = 2
INDEX_DIR = "index"


class _OlderState(ValueError):
  """A memory state written before the memory and its state were one unit."""


def _read_state(folder) -> dict:
  """The state file of the memory unit in ``folder``, its fields checked (ValueError)."""
  from resmem_jax.memory import io as memory_io  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, STATE_FILE)
  with memory_io._open_regular(path) as f:  # pylint: disable=protected-access
    state = jsonio.loads(f.read())
  if not isinstance(state, dict):
    raise ValueError(f"{path} is not a JSON object")
  if state.get("version") != STATE_VERSION:
    raise _OlderState(f"{path} was written by an older resmem_jax (format {state.get('version', 1)}"
                      f", this code writes {STATE_VERSION})")
  record = state.get("memory")
  if (not isinstance(state.get("signature"), dict) or not isinstance(state.get("choice"), dict)
      or not isinstance(record, dict)
      or not (isinstance(record.get("manifest_sha256"), str) or isinstance(record.get("parts"), list))):
    raise ValueError(f"{path} lacks its signature, choice or memory digest")
  return state


def _unit_complete(folder) -> bool:
  """Whether ``folder`` is a whole memory unit: its state valid and naming the memory beside it
  (what a killed save's copy must be to be put back)."""
  from resmem_jax.memory import io as memory_io  # pylint: disable=g-import-not-at-top
  try:
    state = _read_state(folder)
    index = os.path.join(folder, INDEX_DIR)
    return (memory_io.is_complete(index)
            and memory_io.manifest_digest(index) == state["memory"].get("manifest_sha256"))
  except (OSError, ValueError):
    return False


def _is_unit(folder) -> bool:
  """Whether ``folder`` is a memory unit this library wrote (any format): a state file that parses
  as one, and nothing beside it but its memory (or its memory's parts, one per process)."""
  from resmem_jax.memory import atomic_dir  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import io as memory_io  # pylint: disable=g-import-not-at-top
  try:
    names = os.listdir(folder)
    index = os.path.join(folder, INDEX_DIR)
    with memory_io._open_regular(os.path.join(folder, STATE_FILE)) as f:  # pylint: disable=protected-access
      state = jsonio.loads(f.read())
    if not isinstance(state, dict) or not isinstance(state.get("signature"), dict):
      return False
    for name in names:
      if name in (STATE_FILE,) or atomic_dir.is_own_entry(index, name):
        continue
      if name != INDEX_DIR or os.path.islink(index):
        return False
      if not memory_io.is_saved_memory(index):
        for part in os.listdir(index):  # a memory split across hosts: one part per process
          if not (re.fullmatch(r"process_\d+", part)
                  and memory_io.is_saved_memory(os.path.join(index, part))
                  or re.fullmatch(r"\.process_\d+\.(lock|(tmp|old|del)-[0-9a-f-]+)", part)):
            return False
    return True
  except (OSError, ValueError):
    return False


def _check_unit_replaceable(folder) -> None:
  if os.path.lexists(folder) and not (os.path.isdir(folder) and not os.path.islink(folder)
                                      and (not os.listdir(folder) or _is_unit(folder))):
    raise ValueError(f"{folder} is not a memory this run wrote; move it out of the workdir")


def save_memory_unit(mem_dir: pathlib.Path, memory, state: dict) -> None:
  """Writes the memory and its state as one unit at ``mem_dir`` (see :func:`_memory`)."""
  from resmem_jax.memory import atomic_dir  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import io as memory_io  # pylint: disable=g-import-not-at-top
  if os.path.lexists(mem_dir):
    try:
      _check_unit_replaceable(mem_dir)
    except ValueError:
      _set_aside(mem_dir, "it is not a memory unit this library wrote")

  def write(folder):
    index = os.path.join(folder, INDEX_DIR)
    memory.save(index)
    unit = dict(state, memory={"manifest_sha256": memory_io.manifest_digest(index)})
    with open(os.path.join(folder, STATE_FILE), "w") as f:  # last: it completes the unit
      json.dump(unit, f, indent=2, sort_keys=True)

  atomic_dir.replace_folder(mem_dir, write, _check_unit_replaceable, _unit_complete)


def _save_host_parts(mem_dir: pathlib.Path, memory, state: dict) -> None:
  """A memory split across hosts: every process saves its own part (``index/process_I``, each
  atomic), then process 0 writes the state naming every part's manifest digest. Collective."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import atomic_dir  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import io as memory_io  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0 and os.path.lexists(mem_dir):
    # No state may name parts while they change: the earlier unit goes first (or aside).
    if _is_unit(mem_dir):
      atomic_dir.discard(mem_dir)
    else:
      _set_aside(mem_dir, "it is not a memory unit this library wrote")
  multihost_utils.sync_global_devices("resmem_jax memory: earlier unit cleared")
  memory.save(mem_dir / INDEX_DIR)
  part = mem_dir / INDEX_DIR / f"process_{jax.process_index()}"
  digest = np.frombuffer(bytes.fromhex(memory_io.manifest_digest(part)), np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
  if jax.process_index() == 0:
    jsonio.write_json_atomic(mem_dir / STATE_FILE, dict(
        state, memory={"parts": [bytes(row.tolist()).hex() for row in digests]}))


def _set_aside(mem_dir: pathlib.Path, reason: str, kind: str = "unreadable") -> None:
  """Moves ``mem_dir`` to a new sibling ``memory.<kind>-<time>`` (never deleted), with a warning."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  aside = mem_dir.with_name(f"{mem_dir.name}.{kind}-{stamp}")
  number = 1
  while os.path.lexists(aside):
    number += 1
    aside = mem_dir.with_name(f"{mem_dir.name}.{kind}-{stamp}-{number}")
  mem_dir.rename(aside)
  log.warning("the saved memory in %s cannot be used (%s); moved it to %s and building the memory "
              "again", mem_dir, reason, aside)


def _saved_memory(mem_dir: pathlib.Path, signature: dict, across_hosts: bool):
  """(memory, choice, tuning) saved for ``signature``, or None (missing, other, unreadable).

  Every process decides alike: a memory split across hosts loads (or fails) on all of them."""
  from resmem_jax import memory as memory_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import atomic_dir  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import hosts  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import io as memory_io  # pylint: disable=g-import-not-at-top
  if not os.path.lexists(mem_dir):
    if not atomic_dir.interrupted(mem_dir):
      return None
    atomic_dir.restore(mem_dir, _unit_complete)  # a kill between the swap's two renames
    if not os.path.lexists(mem_dir):
      return None
  problem = None
  try:
    with atomic_dir.reading(mem_dir):
      state = _read_state(mem_dir)
      if state["signature"] != signature:
        return None
      choice = Choice(**state["choice"])
      index_path = mem_dir / INDEX_DIR
      if across_hosts:
        memory = hosts.HostShardedMemory.load(index_path)
        parts = state["memory"].get("parts") or []
        part = index_path / f"process_{jax.process_index()}"
        try:
          mine = (len(parts) == jax.process_count()
                  and memory_io.manifest_digest(part) == parts[jax.process_index()])
        except (OSError, ValueError):
          mine = False  # still agree below: no process is left waiting for the others
        if not hosts.all_processes_agree(mine):
          raise ValueError(f"the memory parts in {index_path} are not the ones "
                           f"{mem_dir / STATE_FILE} names (a save was interrupted)")
      else:
        recorded = state["memory"].get("manifest_sha256")
        parts, digest = memory_io.read(index_path)
        if digest != recorded:
          raise ValueError(f"the memory in {index_path} is not the one {mem_dir / STATE_FILE} "
                           f"names (manifest digest {digest[:12]}..., recorded "
                           f"{str(recorded)[:12]}...)")
        keys, labels, store, backend, index, metadata = parts
        memory = memory_lib.Memory(keys, store, backend, index, labels, metadata)
      return memory, choice, state.get("tuning")
  except _OlderState as err:
    problem, kind = f"{err}; its memory and state were saved separately", "older"
  except (OSError, ValueError, KeyError, TypeError) as err:
    problem, kind = str(err), "unreadable"
  if jax.process_index() == 0 and os.path.lexists(mem_dir):
    _set_aside(mem_dir, problem, kind)
  return None


def build_memory(r: settings_lib.ResMemSettings, passes: Passes, dataset_name: str):
  """The memory of the training split: ``(memory with the first temperature's residuals,
  {temperature: residual store}, metadata)``; one inference pass gives the keys and the residual
  rows at every candidate temperature, one index serves them all."""
  from resmem_jax import memory as memory_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import store as store_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import hosts  # pylint: disable=g-import-not-at-top
  temperatures = _temperatures(r)
  start = time.perf_counter()
  across_hosts = _across_hosts(r)
  train = inference.concatenate(list(passes.rows("train", passes.forward(
      with_logits=False, temperatures=temperatures, residual_format=r.residual_format,
      top_m=r.top_m), local=across_hosts)))
  dim = train.embeddings.shape[1]
  num_classes = passes.model.num_classes
  stores = {t: store_lib.store_from_arrays(arrays, r.residual_format, num_classes, r.top_m)
            for t, arrays in train.residuals.items()}
  metadata = {"dataset": dataset_name, "checkpoint_step": passes.model.step,
              "model_digest": passes.model.digest}
  options = memory_lib.parse_backend_options(r.backend_options)
  if across_hosts and r.backend == "approx":
    options.setdefault("across_hosts", False)  # each host's part on its own devices
  memory = memory_lib.memory_from_store(train.embeddings, stores[temperatures[0]], r.backend,
                                        labels=train.labels, metadata=metadata, **options)
  if across_hosts:  # this process's rows only; searches ask every host
    memory = hosts.HostShardedMemory(memory)
  del train
  log.info("memory: %s rows of dimension %d (%s, %s residuals) in %.1f s", f"{memory.size:,}", dim,
           r.backend, r.residual_format, time.perf_counter() - start)
  return memory, stores, metadata


def build_and_select(r: settings_lib.ResMemSettings, passes: Passes, dataset_name: str):
  """The memory at the chosen temperature, the choice, and the ScaNN query tuning (or None)."""
  memory, stores, metadata = build_memory(r, passes, dataset_name)
  start = time.perf_counter()
  if settings_lib.needs_validation(r):
    by_temperature = {t: memory.with_store(store) for t, store in stores.items()}
    choice, validation_queries = select_on_validation(r, passes, memory, by_temperature)
  else:
    choice, validation_queries = fixed_choice(r), None
  memory = memory.with_store(stores[choice.resmem["temperature"]],
                             metadata=dict(metadata, temperature=choice.resmem["temperature"]))
  res = choice.resmem
  chosen = (f"k={res['k']} sigma={res['sigma']:.4g} T={res['temperature']:g}"
            + (f" base_mix={res['base_mix']:g}" if res.get("base_mix") is not None else ""))
  how = (f"chosen on {choice.validation_rows:,} validation rows" if choice.chosen_on == "validation"
         else "fixed in the config")
  log.info("selection: %s, %s in %.1f s", chosen, how, time.perf_counter() - start)
  if choice.gate is not None:
    log.info("gate (opt-in): %s", report.gate_sentence(choice.gate))
  tuning = None
  if r.tune_recall is not None:
    # ScaNN's query settings on the real query distribution (validation embeddings) at the
    # chosen k: the fastest reaching recall@k >= tune_recall against exact search.
    tuning = memory.tune_search(validation_queries, int(choice.resmem["k"]), r.tune_recall)
    tuning.pop("tried", None)
    log.info("memory: ScaNN query settings tuned on validation: %s leaves, reorder %s, recall@%s "
             "%.3f", tuning["leaves_to_search"], tuning["reorder"], choice.resmem["k"],
             tuning["recall"])
  return memory, choice, tuning


def fixed_choice(r: settings_lib.ResMemSettings) -> Choice:
  knn = None
  if r.knnlm:
    knn = {"k": r.k, "sigma": r.sigma, "temperature": r.temperature, "lambda": r.knn_lambda}
  return Choice(resmem={"k": r.k, "sigma": r.sigma, "temperature": r.temperature,
                        "base_mix": r.base_mix}, knnlm=knn,
                chosen_on="fixed", sigma_scale=None, validation_base=None, validation_rows=0,
                grid=[])


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


def validation_sweep(r: settings_lib.ResMemSettings, passes: Passes, memory, by_temperature: dict):
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
          k_grid=k_grid, sigma_grid=sigma_grid, temperature_grid=_temperatures(r),
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


def select_on_validation(r: settings_lib.ResMemSettings, passes: Passes, memory,
                         by_temperature: dict):
  """ResMem's (and kNN-LM's) choice on the validation split, and the gate's decision when asked.

  Returns the choice and the first chunk's embeddings (the queries ScaNN's settings are tuned on).
  """
  sweep, scale, tuning_queries = validation_sweep(r, passes, memory, by_temperature)
  resmem_points, knn_points = sweep.points()
  best = selection.best(resmem_points, r.select_by)
  fixed = r.k is not None and r.sigma is not None and r.temperature is not None
  chosen = {"k": best.k, "sigma": best.sigma, "temperature": best.temperature,
            "base_mix": best.base_mix, "validation_accuracy": best.accuracy,
            "validation_squared_loss": best.squared_loss, "validation_log_loss": best.log_loss}
  knn = None
  if sweep.lambda_grid is not None:
    best_knn = selection.best(knn_points, r.select_by)
    knn = {"k": best_knn.k, "sigma": best_knn.sigma, "temperature": best_knn.temperature,
           "lambda": best_knn.knn_lambda, "validation_accuracy": best_knn.accuracy,
           "validation_squared_loss": best_knn.squared_loss,
           "validation_log_loss": best_knn.log_loss}
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
  parts = {"resmem": [], "comparator": [], "units": []}
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
  return gate.decision(r.gate_alpha, r.select_by, half, test)


# ----------------------------------------------------------------------------- evaluation


@jax.jit
def _row_metrics(pred, labels):
  return metrics.per_row(pred, labels)


_base_prediction = jax.jit(predictor.base_prediction)


@jax.jit
def _knnlm(base, distances, sigma, neighbour_labels, lam):
  weights = predictor.neighbour_weights(distances, sigma)
  p_knn = predictor.knn_distribution(weights, neighbour_labels, base.shape[-1])
  return predictor.knnlm_mixture(p_knn, base, lam)


class _Totals:
  """Per-row metrics of one head, accumulated over chunks."""

  def __init__(self):
    self.parts = {"hit": [], "squared_loss": [], "log_loss": []}

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
    return np.concatenate(self.parts["hit"]).astype(bool) if self.parts["hit"] else np.zeros(0, bool)


def predict_rows(memory, choice: Choice, chunk: inference.Rows):
  """``(p_base, ResMem's p + r, ResMem's probabilities, kNN-LM's prediction or None)`` for one chunk
  of rows; one neighbour query serves both heads."""
  res = choice.resmem
  base_1 = _base_prediction(chunk.logits, np.float32(1.0))
  k = int(res["k"])
  k_query = max(k, int(choice.knnlm["k"]) if choice.knnlm else 0)
  distances, ids = memory.search(chunk.embeddings, k_query)
  base_t = _base_prediction(chunk.logits, np.float32(res["temperature"]))
  resmem_pred = resmem_lib.combine(base_t, distances[:, :k], memory.residual_rows(ids[:, :k]),
                                   res["sigma"])
  resmem_prob = _probabilities(resmem_pred, base_1, np.float32(res["base_mix"]))
  knn_pred = None
  if choice.knnlm:
    knn = choice.knnlm
    kk = int(knn["k"])
    knn_pred = _knnlm(_base_prediction(chunk.logits, np.float32(knn["temperature"])),
                      distances[:, :kk], np.float32(knn["sigma"]), memory.labels_of(ids[:, :kk]),
                      np.float32(knn["lambda"]))
  return base_1, resmem_pred, resmem_prob, knn_pred


_probabilities = jax.jit(predictor.resmem_probabilities)


def evaluate(passes: Passes, memory, choice: Choice, r: settings_lib.ResMemSettings, split: str,
             timed: bool) -> dict:
  """Base, ResMem (and kNN-LM) metrics on every row of ``split``.

  Returns ``{head: summary}`` plus ``rows``, per-row ``hits`` and, when ``timed``, ``timing``: the
  base forward pass against ResMem's extra cost (neighbour query + combination), each the fastest
  of ``r.timing_repeats`` timed passes after the (compiling) evaluation pass.
  """
  num_classes = passes.model.num_classes
  rows_per_chunk = chunk_rows(num_classes, high=16384)
  forward = passes.forward(with_logits=True)
  totals = {head: _Totals() for head in HEADS if head != "knnlm" or choice.knnlm}
  count = 0
  for chunk in inference.rechunk(passes.rows(split, forward), rows_per_chunk):
    base_1, resmem_pred, resmem_prob, knn_pred = predict_rows(memory, choice, chunk)
    totals["base"].add(_row_metrics(base_1, chunk.labels))
    # ResMem's class and squared loss are those of p + r, its log loss that of its probabilities.
    totals["resmem"].add(dict(_row_metrics(resmem_pred, chunk.labels),
                              log_loss=_row_metrics(resmem_prob, chunk.labels)["log_loss"]))
    if knn_pred is not None:
      totals["knnlm"].add(_row_metrics(knn_pred, chunk.labels))
    count += chunk.size
  if count == 0:
    raise ValueError(f"the {split} split produced no rows")
  out = {head: t.summary(split) for head, t in totals.items()}
  out["rows"] = count
  out["hits"] = {head: t.hits for head, t in totals.items()}
  if timed:
    out["timing"] = _time_prediction(passes, memory, choice, split, forward, rows_per_chunk,
                                     r.timing_repeats)
  return out


def _time_prediction(passes, memory, choice, split, forward, rows_per_chunk, repeats) -> dict:
  res = choice.resmem
  forward_s, query_s = [], []
  for _ in range(max(1, repeats)):
    spent_forward = spent_query = 0.0
    for chunk in inference.rechunk(passes.rows(split, forward), rows_per_chunk):
      spent_forward += chunk.seconds
      start = time.perf_counter()
      distances, ids = memory.search(chunk.embeddings, int(res["k"]))
      base_t = _base_prediction(chunk.logits, np.float32(res["temperature"]))
      np.asarray(resmem_lib.combine(base_t, distances, memory.residual_rows(ids), res["sigma"]))
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


# ----------------------------------------------------------------------------- results


def assemble_results(settings, info, model: BaseModel, memory, choice: Choice, tuning, reused,
                     evaluation: dict, train_eval: dict | None, training_metrics: dict) -> dict:
  """The results.json dictionary: the same schema for every data set."""
  heads = [h for h in HEADS if h in evaluation]
  validation = {"base": choice.validation_base, "resmem": choice.resmem, "knnlm": choice.knnlm}
  blocks = {}
  for head in heads:
    block = dict(evaluation[head])
    scores = validation[head] or {}
    for name in ("accuracy", "squared_loss", "log_loss"):
      key = name if head == "base" else f"validation_{name}"
      block[f"validation_{name}"] = scores.get(key)
    if train_eval is not None:
      block["train_accuracy"] = train_eval[head]["train_accuracy"]
    blocks[head] = block
  res = choice.resmem
  # ResMem always memorizes (the paper's rule): every figure under "resmem" is the memory's. The
  # opt-in gate's decision is its own block.
  hparams = {"k": int(res["k"]), "sigma": float(res["sigma"]),
             "temperature": float(res["temperature"]), "base_mix": res.get("base_mix"),
             "memorize": True, "chosen_on": choice.chosen_on,
             "select_by": settings.resmem.select_by, "sigma_scale": choice.sigma_scale}
  if choice.knnlm:
    hparams["knnlm"] = {name: choice.knnlm[name] for name in ("k", "sigma", "temperature", "lambda")}
  row = "token" if info.input_dtype == "int32" else "example"
  results = {
      "dataset": info.name, "model": settings.model.name, "num_params": model.num_params,
      "checkpoint_step": model.step, "model_digest": model.digest, "row": row,
      "num_rows": {"train": int(memory.size), "validation": int(choice.validation_rows),
                   "test": int(evaluation["rows"])},
      **blocks,
      "hparams": hparams,
      "gate": choice.gate if choice.gate is not None else {"enabled": False},
      "memory": {"backend": memory.backend, "residual_format": memory.residual_format,
                 "top_m": settings.resmem.top_m if memory.residual_format == "sparse" else None,
                 "size": int(memory.size), "dim": int(memory.dim), "reused": bool(reused),
                 "backend_options": settings_lib.json_ready(memory.backend_options),
                 "search_tuning": tuning},
      "comparison": metrics.paired_comparison(evaluation["hits"]["resmem"],
                                              evaluation["hits"]["base"]),
      **({"comparison_knnlm": metrics.paired_comparison(evaluation["hits"]["knnlm"],
                                                        evaluation["hits"]["base"])}
         if "knnlm" in evaluation["hits"] else {}),
      "timing": evaluation["timing"],
      "training": {k: v for k, v in training_metrics.items() if isinstance(v, (int, float))},
      "log_loss_rule": (f"{metrics.LOG_LOSS_RULE}; ResMem's is that of its probability output, "
                        f"{predictor.PROBABILITY_RULE}"),
      "config": settings_lib.to_dict(settings),
  }
  return results
