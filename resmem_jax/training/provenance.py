"""What a workdir's trained model was made from, checked before any work on a rerun.

``WORKDIR/run.json`` records the first run's full resolved settings and the package versions it
ran with, and, once training has finished, the content digest of the final checkpoint's variables.
A rerun whose settings differ in anything that changes the trained model refuses before doing any
work while that model exists, naming the differing fields and the ways forward. Which fields
those are is each field's own declaration (``affects="model"`` in ``settings.py``); the others,
which change only the memory and its choice (``"memory"``) or nothing trained (``"report"``: where
data is read from, how often to log or checkpoint, ...), may change freely. ``start_over`` moves the earlier run
into ``WORKDIR/superseded/<time>/`` (nothing is deleted) and trains afresh.

The digest ties everything derived from the model (the memory, results.json) to the model's
content, not to a step number: a checkpoint that changes on disk after training is refused, and a
retrained model gets a new memory. Every checkpoint the run writes is recorded first
(``checkpoints``: step -> digest, written before the checkpoint itself, so a kill never leaves a
step the record does not know), and every step restored is checked against that record: a
checkpoint copied in from another run, or changed on disk, is refused in one line.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import pathlib
from importlib import metadata
from typing import Any

import jax
import numpy as np

from resmem_jax import jsonio
from resmem_jax import settings as settings_lib

RUN_FILE = "run.json"
SUPERSEDED = "superseded"
CHECKPOINT_DIR = "checkpoints"
# What start_over moves aside: every file and folder a run writes into its workdir.
RUN_ENTRIES = (CHECKPOINT_DIR, "metrics.jsonl", "tensorboard", "model_info.json", RUN_FILE,
               "memory", "results.json")
PACKAGES = ("numpy", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
            "tensorflow-cpu", "tensorflow", "scann", "resmem_jax")
START_OVER_HINT = ("use another --workdir, or pass --start_over to move the earlier run to "
                   "WORKDIR/superseded/ and train again")


class WorkdirError(ValueError):
  """The workdir holds a run that does not match, or a record that cannot be read."""


def model_fields(settings: settings_lib.Settings) -> dict[str, Any]:
  """``{"section.field": value}`` of every field that changes the trained model: those declared
  ``affects="model"``. run.json records them and a rerun that changes one is refused."""
  return settings_lib.fields_affecting(settings, ["model"])


def versions() -> dict[str, str]:
  """Installed versions of the packages a result depends on (without importing them)."""
  out = {}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      continue
  return out


def variables_digest(variables) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes: the model's content.

  A PRNG key array (an NNX module's RNG streams, ``jax.random.key``) has no NumPy form: its raw
  words (``jax.random.key_data``) are digested under the key's own dtype (``key<fry>``), so a key
  and the same words held as uint32 digest apart. Every other leaf digests as it always has.
  """
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]
  for path, leaf in leaves:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      shape, words = leaf.shape, np.ascontiguousarray(np.asarray(jax.random.key_data(leaf)))
    else:
      words = np.ascontiguousarray(np.asarray(leaf))
      dtype, shape = words.dtype, words.shape
    digest.update(f"{jax.tree_util.keystr(path)}|{dtype}|{shape}|".encode())
    digest.update(words.tobytes())
  return digest.hexdigest()


def has_trained_model(workdir: pathlib.Path) -> bool:
  folder = workdir / CHECKPOINT_DIR
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def read(workdir: pathlib.Path) -> dict | None:
  """The workdir's run record, or None when there is none."""
  path = workdir / RUN_FILE
  if not path.exists():
    return None
  try:
    record = jsonio.loads(path.read_text())
    if not isinstance(record, dict) or not isinstance(record.get("model_fields"), dict):
      raise ValueError("no model_fields")
  except (OSError, ValueError) as err:
    raise WorkdirError(f"{path} cannot be read ({err}), so what the model in {workdir} was "
                       f"trained with is unknown; restore that file, or {START_OVER_HINT}") from None
  return record


def _write(workdir: pathlib.Path, record: dict) -> None:
  if jax.process_index() == 0:
    jsonio.write_json_atomic(workdir / RUN_FILE, record)


def move_aside(workdir: pathlib.Path) -> pathlib.Path | None:
  """Moves an earlier run's files into WORKDIR/superseded/<time>/; returns that folder."""
  present = [name for name in RUN_ENTRIES if (workdir / name).exists()]
  if not present:
    return None
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
  target = workdir / SUPERSEDED / stamp
  if jax.process_index() == 0:
    target.mkdir(parents=True)
    for name in present:
      (workdir / name).rename(target / name)
  return target


# What a field absent from an older run.json stood for: the behaviour before the field existed.
VALUE_BEFORE_FIELD = {"model.cpu_compiler_options": "xla_default"}


def differences(recorded: dict, current: dict) -> list[str]:
  """``"field: old -> new"`` for every model field that differs."""
  recorded = {**{n: v for n, v in VALUE_BEFORE_FIELD.items() if n in current}, **recorded}
  names = sorted(set(recorded) | set(current))
  return [f"{n}: {recorded.get(n, '(absent)')!r} -> {current.get(n, '(absent)')!r}"
          for n in names if recorded.get(n) != current.get(n)]


def prepare(workdir: pathlib.Path, settings: settings_lib.Settings, *,
            start_over: bool = False) -> dict:
  """Checks (or creates) WORKDIR's run record before any work; returns the record in force.

  Raises WorkdirError when the workdir holds a trained model made with other model fields, or a
  trained model without a record.
  """
  workdir = pathlib.Path(workdir)
  if start_over:
    moved = move_aside(workdir)
    if moved is not None:
      logging.getLogger("resmem_jax").warning("start_over: the earlier run in %s was moved to %s",
                                              workdir, moved)
  record = read(workdir)
  current = model_fields(settings)
  if record is not None:
    changed = differences(record["model_fields"], current)
    if not changed:
      upgraded = differences(record.get("versions", {}), versions())
      if upgraded:
        logging.getLogger("resmem_jax").warning(
            "%s was trained with other package versions (%s)", workdir, "; ".join(upgraded))
      return record
    if has_trained_model(workdir):
      raise WorkdirError(f"{workdir} holds a model trained with other settings ("
                         f"{'; '.join(changed)}): these change the trained model; "
                         f"{START_OVER_HINT}")
  elif has_trained_model(workdir):
    raise WorkdirError(f"{workdir} holds a trained model but no {RUN_FILE}, so what it was "
                       f"trained with is unknown; {START_OVER_HINT}")
  record = {"settings": settings_lib.to_dict(settings), "model_fields": current,
            "versions": versions(),
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  workdir.mkdir(parents=True, exist_ok=True)
  _write(workdir, record)
  return record


def record_checkpoint(workdir: pathlib.Path, step: int, digest: str) -> None:
  """Records the digest of the checkpoint this run is about to write at ``step`` (before it
  exists). Dropped: steps older than the oldest on disk (the checkpoint manager deleted them; saves
  still in flight are not on disk yet, so they are kept). Without a run record (the training loop
  called as a library) there is nothing to record into."""
  workdir = pathlib.Path(workdir)
  if jax.process_index() != 0:
    return
  record = read(workdir)
  if record is None:
    return
  folder = workdir / CHECKPOINT_DIR
  on_disk = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
  oldest = min(on_disk, default=int(step))
  known = record.get("checkpoints")
  if not isinstance(known, dict):
    known = {}
  kept = {s: d for s, d in known.items() if s.isdigit() and int(s) >= oldest}
  record["checkpoints"] = {**kept, str(int(step)): digest}
  _write(workdir, record)


def _recorded_digest(record: dict, step: int) -> str | None:
  """The digest the record holds for ``step``: written before the checkpoint, or (older run.json)
  the finished model's."""
  known = record.get("checkpoints")
  if isinstance(known, dict) and str(step) in known:
    return known[str(step)]
  final = record.get("checkpoint")
  if isinstance(final, dict) and final.get("step") == step:
    return final.get("digest")
  return None


def check_restored(workdir: pathlib.Path, step: int, digest: str) -> None:
  """Refuses a restored checkpoint this workdir's run did not write, or whose content changed.
  Without a run record (the training loop called as a library) there is nothing to check."""
  workdir = pathlib.Path(workdir)
  record = read(workdir)
  if record is None:
    return
  folder = workdir / CHECKPOINT_DIR / str(step)
  known = _recorded_digest(record, step)
  if known is None:
    raise WorkdirError(
        f"the checkpoint {folder} was not written by the run recorded in {workdir / RUN_FILE} (it "
        f"records no step {step}; copied from another run?); move that folder out of "
        f"{workdir / CHECKPOINT_DIR}, or pass --start_over to move the earlier run to "
        "WORKDIR/superseded/ and train again")
  if known != digest:
    raise WorkdirError(
        f"the checkpoint {folder} changed after training wrote it (content digest {digest[:12]}..., "
        f"recorded {str(known)[:12]}...): a file was modified, corrupted or replaced; restore it, "
        f"or move that folder out of {workdir / CHECKPOINT_DIR}, or pass --start_over to move the "
        "earlier run to WORKDIR/superseded/ and train again")


def check_checkpoint(workdir: pathlib.Path, step: int, digest: str) -> None:
  """Checks the finished model against the record (:func:`check_restored`) and records it."""
  workdir = pathlib.Path(workdir)
  record = read(workdir)
  if record is None:
    raise WorkdirError(f"{workdir / RUN_FILE} disappeared during the run; {START_OVER_HINT}")
  check_restored(workdir, step, digest)
  if record.get("checkpoint") != {"step": int(step), "digest": digest}:
    record["checkpoint"] = {"step": int(step), "digest": digest}
    _write(workdir, record)
