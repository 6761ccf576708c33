"""The job engine: what a workdir adds to fitting ResMem, one run for every data set.

    results = engine.run(settings, workdir)

1. Check the settings and read the data set's shape (seconds, before any training).
2. Train the base model into WORKDIR (or resume / reuse the finished checkpoint there).
3. The memory and its choice (``fitting.build_and_select``), saved in WORKDIR/memory as one unit
   and reused by a rerun whose checkpoint, data and memory settings match.
4. Evaluation on the test split (and the training split): base, ResMem (and kNN-LM) side by side,
   and ResMem's prediction time against the base forward pass (``fitting.evaluate``).
5. WORKDIR/results.json, one schema for every data set (``jobs/report.py`` prints it), which
   describes itself under ``"run"`` (versions, commit, times, devices, command line).

What differs between data sets is configuration: the residual format (sparse for vocabularies),
the kNN-LM head (``resmem.knnlm``) and whether the training split is evaluated.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import time
from typing import TYPE_CHECKING

import jax
import numpy as np

from resmem_jax import compiler_options
from resmem_jax import fitting
from resmem_jax import jsonio
from resmem_jax import mesh as mesh_lib
from resmem_jax import settings as settings_lib
from resmem_jax import validate
from resmem_jax.core import gate
from resmem_jax.core import metrics
from resmem_jax.core import predictor
from resmem_jax.jobs import run_info

if TYPE_CHECKING:
  from resmem_jax.memory.protocol import ResidualMemory

log = logging.getLogger("resmem_jax")


# ----------------------------------------------------------------------------- the run


def run(settings: settings_lib.Settings, workdir: str | os.PathLike, *,
        progress: bool = True, start_over: bool = False) -> dict:
  """Trains (if needed), memorizes, selects, evaluates; writes and returns ``results.json``.

  Everything is checked before any work: the settings, the data set's shape and the workdir's
  record (a model trained with other settings is refused; ``start_over`` moves that run to
  WORKDIR/superseded/ first).
  """
  started = run_info.now()
  workdir = pathlib.Path(workdir)
  # The workdir's lock (one writer per workdir), taken once the settings are checked, is held
  # until results.json is written.
  with contextlib.ExitStack() as lock_scope:
    info, trained, passes = trained_passes(settings, workdir, progress=progress,
                                           start_over=start_over, lock_scope=lock_scope)
    model = passes.model
    memory, choice, tuning, reused = _memory(settings, passes, workdir)
    start = time.perf_counter()
    evaluation = fitting.evaluate(passes, memory, choice, "test",
                                  timing_repeats=settings.resmem.timing_repeats)
    train_eval = (fitting.evaluate(passes, memory, choice, "train")
                  if settings.resmem.evaluate_train else None)
    log.info("evaluation: %s in %.1f s", "test and train splits" if train_eval else "test split",
             time.perf_counter() - start)
    results = assemble_results(settings, info, model, memory, choice, tuning, reused,
                               evaluation, train_eval, trained.metrics,
                               run=run_info.describe(started, run_info.now()))
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

  validate.check(settings)
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
  passes = fitting.Passes(dataset, model, settings.resmem.eval_batch_size, progress,
                          fold_block=fitting.rows_per_example(info))
  return info, trained, passes


def _check_before_training(settings, dataset) -> None:
  """What can only be checked once the data set's size is known, still before training."""
  r = settings.resmem
  validate.check_against_data(settings, dataset.info)  # k, empty train split, sizes that fit
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
                model_settings: settings_lib.ModelSettings) -> fitting.BaseModel:
  from resmem_jax import models  # pylint: disable=g-import-not-at-top
  module = trained.module
  mesh = mesh_lib.data_mesh()
  return fitting.BaseModel(apply_fn=lambda v, x: module.apply(v, x, train=False),
                   variables=mesh_lib.replicate(trained.variables, mesh),
                   step=int(trained.step), digest=trained.digest,
                   num_params=models.count_params(trained.variables),
                   num_classes=int(num_classes),
                   compiler_options=compiler_options.for_model(model_settings, mesh))


# ----------------------------------------------------------------------------- memory + selection


def memory_signature(settings: settings_lib.Settings, model_digest: str) -> dict:
  """What the saved memory and its choice were made from: the model's content (not its step),
  every settings field declared to affect the model or the memory (``{"seed": ..., "data": {...},
  "model": {...}, "train": {...}, "resmem": {...}}``, derived from the declarations in
  settings.py, so a new field is in it without a list to edit) and the rules the choice follows.
  A rerun reuses them only when equal."""
  r = settings.resmem
  return {
      **settings_lib.values_affecting(settings, ("model", "memory")),
      "model_digest": model_digest,
      "gate_rule": gate.GATE_RULE if r.gate_alpha is not None else None,
      "probability_rule": predictor.PROBABILITY_RULE,
      # A memory split across hosts is one part per process: reusable by as many processes only.
      "memory_hosts": jax.process_count() if settings.resmem.memory_across_hosts else 1,
  }


def _memory(settings, passes: fitting.Passes, workdir: pathlib.Path):
  """(memory, choice, search tuning, reused): the saved memory when it matches, else built.

  WORKDIR/memory is one unit: the memory (``index/``) and its state (``resmem.json``: the
  signature, the choice and the memory's manifest digest) are written into one folder swapped in
  at once, so a kill at any write leaves the old unit or the new one, and a read checks that the
  memory is the one the state names. A saved unit that cannot be used is a cache: it is set aside
  (never deleted) with a warning and the memory is built again.
  """
  mem_dir = workdir / UNIT_DIR
  signature = memory_signature(settings, passes.model.digest)
  across_hosts = fitting.across_hosts(settings.resmem)
  saved = _saved_memory(mem_dir, signature, across_hosts)
  if saved is not None:
    log.info("memory: reusing %s (%s rows, its settings and model unchanged)", mem_dir,
             f"{saved[0].size:,}")
    return (*saved, True)
  memory, choice, tuning = fitting.build_and_select(settings.resmem, passes, settings.data.name)
  state = {"version": STATE_VERSION, "signature": signature,
           "choice": choice.to_json(), "tuning": tuning}
  if across_hosts:
    _save_host_parts(mem_dir, memory, state)
  elif jax.process_index() == 0:
    save_memory_unit(mem_dir, memory, state)
  return memory, choice, tuning, False


# 2: the memory and its state are one folder swapped in as a unit; the state names the memory's
# manifest digest (or, split across hosts, each part's). 1 (no "version"): two separate writes.
STATE_VERSION = 2
# WORKDIR/memory, the unit: its state file beside the memory itself.
UNIT_DIR = "memory"
UNIT_STATE_FILE = "resmem.json"
INDEX_DIR = "index"


class _OlderState(ValueError):
  """A memory state written before the memory and its state were one unit."""


def _read_state(folder) -> dict:
  """The state file of the memory unit in ``folder``, its fields checked (ValueError)."""
  from resmem_jax.memory import io as memory_io  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, UNIT_STATE_FILE)
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
    state_path = os.path.join(folder, UNIT_STATE_FILE)
    with memory_io._open_regular(state_path) as f:  # pylint: disable=protected-access
      state = jsonio.loads(f.read())
    if not isinstance(state, dict) or not isinstance(state.get("signature"), dict):
      return False
    for name in names:
      if name in (UNIT_STATE_FILE,) or atomic_dir.is_own_entry(index, name):
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
    with open(os.path.join(folder, UNIT_STATE_FILE), "w") as f:  # last: it completes the unit
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
    jsonio.write_json_atomic(mem_dir / UNIT_STATE_FILE, dict(
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
      choice = fitting.Choice.from_json(state["choice"])
      index_path = mem_dir / INDEX_DIR
      memory: ResidualMemory
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
                           f"{mem_dir / UNIT_STATE_FILE} names (a save was interrupted)")
      else:
        recorded = state["memory"].get("manifest_sha256")
        parts, digest = memory_io.read(index_path)
        if digest != recorded:
          raise ValueError(f"the memory in {index_path} is not the one "
                           f"{mem_dir / UNIT_STATE_FILE} names (manifest digest "
                           f"{digest[:12]}..., recorded {str(recorded)[:12]}...)")
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


# ----------------------------------------------------------------------------- results


def assemble_results(settings, info, model: fitting.BaseModel, memory, choice: fitting.Choice,
                     tuning, reused, evaluation: dict, train_eval: dict | None,
                     training_metrics: dict, run: dict | None = None) -> dict:
  """The results.json dictionary: the same schema for every data set. ``run``: what made it
  (``run_info.describe``: schema version, package versions, commit, times, devices, command
  line), under the key ``"run"``."""
  heads = [h for h in fitting.HEADS if h in evaluation]
  names = ("accuracy", "squared_loss", "log_loss")
  base = choice.validation_base  # None when nothing was chosen on validation
  validation = {"base": {n: None if base is None else base[n] for n in names}}
  for head in ("resmem", "knnlm"):
    chosen = getattr(choice, head)
    if chosen is not None:
      validation[head] = {n: getattr(chosen, f"validation_{n}") for n in names}
  blocks = {}
  for head in heads:
    block = dict(evaluation[head])
    block.update({f"validation_{n}": value for n, value in validation[head].items()})
    if train_eval is not None:
      block["train_accuracy"] = train_eval[head]["train_accuracy"]
    blocks[head] = block
  res = choice.resmem
  # ResMem always memorizes (the paper's rule): every figure under "resmem" is the memory's. The
  # opt-in gate's decision is its own block.
  hparams = {"k": int(res.k), "sigma": float(res.sigma), "temperature": float(res.temperature),
             "base_mix": res.base_mix, "memorize": True, "chosen_on": choice.chosen_on,
             "select_by": settings.resmem.select_by, "sigma_scale": choice.sigma_scale}
  if choice.knnlm:
    knn = choice.knnlm
    hparams["knnlm"] = {"k": knn.k, "sigma": knn.sigma, "temperature": knn.temperature,
                        "lambda": knn.knn_lambda}
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
                 "key_format": settings.resmem.key_format,
                 "top_m": settings.resmem.top_m if memory.residual_format.startswith("sparse") else None,
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
  if run is not None:
    results["run"] = run
  return results
