"""The model-level API: ResMem around your own Flax model, in one call.

    resmem = resmem_jax.fit(model, variables, train=(x_train, y_train),
                            validation=(x_val, y_val))
    resmem.predict(x_test)                      # classes: argmax(p + r)
    resmem.predict_proba(x_test)                # ResMem's probability output
    resmem.evaluate(x_test, y_test)             # base vs ResMem, with the paired comparison
    resmem.save("/tmp/resmem"); resmem = resmem_jax.ResMem.load("/tmp/resmem", model, variables)

``model`` is a Flax Linen module (with its ``variables``), an NNX module (``variables=None``), or
any function ``apply(variables, inputs) -> (logits, embedding)`` (or ``apply(inputs)`` with
``variables=None``). Data are ``(inputs, labels)`` arrays or an iterable of batches
(:mod:`resmem_jax.data.user`). :func:`fit` runs the same steps as the ``resmem-jax`` tool
(:mod:`resmem_jax.fitting`, which the tool's :mod:`resmem_jax.jobs.engine` runs too): one masked,
jitted inference pass over the training data, the memory, the choice of k, sigma, T (and the
probability output's mix) on validation, so the tool and a notebook give the same numbers for the
same model and data.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import pathlib
import re
from typing import Any, Callable

import jax
import numpy as np

from resmem_jax import fitting
from resmem_jax import inference
from resmem_jax import jsonio
from resmem_jax import mesh as mesh_lib
from resmem_jax import settings as settings_lib
from resmem_jax import suggest
from resmem_jax.core import metrics
from resmem_jax.data import user

# ResMem.save's folder: its state file beside its memory.
STATE_FILE = "resmem.json"
MEMORY_DIR = "memory"


def apply_function(model, variables) -> tuple[Callable, Any]:
  """``(apply(variables, inputs) -> (logits, embedding), variables)`` for any supported model.

  The model is always evaluated in inference mode, so its outputs are deterministic:

  * an NNX module as ``model.eval()`` sets it (dropout off, batch norm on its running averages),
    on a copy (the module passed in keeps its mode). Its RNG streams (``nnx.Rngs``, a dropout's
    ``rngs=``) are kept but unused, and are not in the returned variables: they advance as a
    model trains without changing what it computes in inference mode, so the variables' digest
    (what a save is checked against) is its parameters and batch statistics only.
  * a Linen module with ``mutable=False``: batch statistics are read, never updated.
  * either module called with ``train=False`` / ``deterministic=True`` where its ``__call__``
    takes that argument.
  * a function ``apply(variables, inputs)`` (or ``apply(inputs)`` with ``variables=None``) as is.
  """
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    has_nnx = True
  except ImportError:  # an older flax without NNX
    has_nnx = False
  if has_nnx and isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError("an NNX module holds its own state: pass variables=None")
    evaluated = nnx.clone(model)  # shares the arrays; only the copy's mode changes
    evaluated.eval()
    flags = _inference_flags(evaluated)
    # The graph definition is that of the module in inference mode whatever mode it was passed
    # in, so a save and a later load of the same model describe the same architecture.
    graphdef, *states = nnx.split(evaluated, nnx.RngState, ...)  # one state per filter
    streams, state = states

    def apply_nnx(state, inputs):
      return nnx.merge(graphdef, streams, state)(inputs, **flags)

    return apply_nnx, state
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  if isinstance(model, nn.Module):
    if variables is None:
      raise ValueError("a Linen module needs its variables (the dict module.init returned)")
    kwargs = _inference_flags(model)
    return (lambda v, x: model.apply(v, x, mutable=False, **kwargs)), variables
  if callable(model):
    if variables is None:
      return (lambda _, x: model(x)), {}
    return model, variables
  raise ValueError(f"model must be a Flax Linen or NNX module or a function returning (logits, "
                   f"embedding), got {type(model).__name__}")


def _inference_flags(module) -> dict:
  """``train=False`` / ``deterministic=True`` for those of the two that ``module.__call__`` takes."""
  params = inspect.signature(type(module).__call__).parameters
  return {name: value for name, value in (("train", False), ("deterministic", True))
          if name in params}


def _resmem_settings(options: dict) -> settings_lib.ResMemSettings:
  defaults = {"backend": "exact", "evaluate_train": False, "timing_repeats": 1}
  for name in options:
    if f"resmem.{name}" in settings_lib.REMOVED_FIELDS:
      raise ValueError(settings_lib.REMOVED_FIELDS[f"resmem.{name}"].replace("resmem.", ""))
  fields = [f.name for f in dataclasses.fields(settings_lib.ResMemSettings)]
  unknown = sorted(set(options) - set(fields))
  if unknown:
    # fit's own keywords are candidates too: a mistyped validation= also lands in options.
    own = [name for name in inspect.signature(fit).parameters
           if name not in ("model", "resmem_options")]
    suggestion = suggest.did_you_mean(unknown[0], own + fields)
    raise ValueError(f"fit() got an unknown keyword {unknown[0]!r}{suggestion}; it takes "
                     f"{', '.join(own)} and the resmem settings {', '.join(fields)}")
  r = settings_lib.ResMemSettings(**{**defaults, **options})
  settings_lib.validate_values(dataclasses.replace(settings_lib.Settings(), resmem=r))
  from resmem_jax import memory  # pylint: disable=g-import-not-at-top
  memory.check_options(r.backend, r.backend_options, r.residual_format, r.key_format)
  return r


def _base_model(apply_fn, variables, splits: user.UserSplits,
                batch_size: int) -> tuple[fitting.BaseModel, int]:
  """The model on the mesh (its class count from one forward pass over a first batch) and the
  rows per example (a label per token: the sequence length)."""
  from resmem_jax import models  # pylint: disable=g-import-not-at-top
  from resmem_jax.training import provenance  # pylint: disable=g-import-not-at-top
  # Two rows (the second padding when train holds one): a model that drops or merges the batch
  # axis shows it here, before any pass.
  first = next(iter(splits.eval_batches("train", 2)))
  logits, _ = _outputs(jax.eval_shape(apply_fn, variables, first["inputs"]), first)
  mesh = mesh_lib.data_mesh()
  return fitting.BaseModel(
      apply_fn=apply_fn, variables=mesh_lib.replicate(variables, mesh), step=0,
      digest=provenance.variables_digest(variables), num_params=models.count_params(variables),
      num_classes=int(logits.shape[-1])), int(np.prod(first["labels"].shape[1:], dtype=np.int64))


def _outputs(outputs, batch: dict) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """The model's ``(logits, embedding)`` shapes on ``batch``, or a one-line ValueError saying what
  :func:`fit` expects and what the model returned."""
  labels = batch["labels"].shape
  if (isinstance(outputs, (tuple, list)) and len(outputs) == 2
      and all(isinstance(o, jax.ShapeDtypeStruct) for o in outputs)
      and all(o.shape[:-1] == labels for o in outputs)):
    return tuple(outputs)
  if isinstance(outputs, jax.ShapeDtypeStruct):
    got = f"a single array {_array(outputs)}"
  elif isinstance(outputs, (tuple, list)) and len(outputs) == 2:
    got = f"logits {_array(outputs[0])} and embedding {_array(outputs[1])}"
  elif isinstance(outputs, (tuple, list)):
    got = (f"a {type(outputs).__name__} of {len(outputs)}: "
           f"({', '.join(_array(o) for o in outputs)})")
  elif isinstance(outputs, dict):
    got = f"a dict with keys {sorted(map(str, outputs))}"
  else:
    got = type(outputs).__name__
  per_token = (f" (labels [batch, {', '.join(map(str, labels[1:]))}]: logits and embedding "
               "[batch, ..., classes or dim])" if len(labels) > 1 else "")
  raise ValueError(f"fit expects the model to return (logits [batch, classes], embedding "
                   f"[batch, dim]){per_token}; on a batch of inputs {_array(batch['inputs'])} it "
                   f"returned {got}")


def _array(value) -> str:
  """``float32[2, 3]`` for an array or its shape, else the type's name."""
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    return f"{value.dtype}[{', '.join(map(str, value.shape))}]"
  return type(value).__name__


def fit(model, variables=None, *, train, validation=None, batch_size: int = 1024,
        progress: bool = True, **resmem_options) -> "ResMem":
  """Builds ResMem around a trained model: memory of ``train``, hyperparameters on ``validation``.

  ``resmem_options`` are fields of :class:`resmem_jax.settings.ResMemSettings` (``backend``,
  ``k_grid``, ``select_by``, ``k``, ...); here ``backend`` defaults to ``"exact"``. Without
  ``validation`` every choice must be fixed (``k``, ``sigma``, ``temperature``, ``base_mix``).
  """
  r = _resmem_settings(resmem_options)
  if validation is None and settings_lib.needs_validation(r):
    raise ValueError("choosing k, sigma and temperature needs validation data: pass "
                     "validation=(inputs, labels), or fix k, sigma, temperature and base_mix")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  apply_fn, variables = apply_function(model, variables)
  splits = user.UserSplits({"train": train, "validation": validation})
  example = splits.example_shape("train")
  if example is not None:  # a padded batch of this many examples must fit in memory
    settings_lib.check_batch_fits("batch_size", int(batch_size), *example)
  base, rows_per_example = _base_model(apply_fn, variables, splits, batch_size)
  # Every split's labels against the model's logits (arrays now, iterables as they are read),
  # and k against the rows the memory will hold, before the first pass.
  splits.set_num_classes(base.num_classes)
  train_examples = splits.num_examples("train")
  if train_examples is not None:
    settings_lib.check_neighbours(r, train_examples * rows_per_example, prefix="")
  passes = fitting.Passes(splits, base, batch_size, progress, fold_block=rows_per_example)
  memory, choice, tuning = fitting.build_and_select(r, passes, "user data")
  return ResMem(memory=memory, choice=choice, settings=r, base=base, batch_size=batch_size,
                tuning=tuning)


@dataclasses.dataclass
class ResMem:
  """A base model with its fitted memory: predictions, evaluation, save and load."""
  memory: Any
  choice: fitting.Choice
  settings: settings_lib.ResMemSettings
  base: fitting.BaseModel
  batch_size: int = 1024
  tuning: dict | None = None

  @property
  def hparams(self) -> dict:
    """What was chosen: ``k``, ``sigma``, ``temperature``, ``base_mix`` and their validation
    scores."""
    return dataclasses.asdict(self.choice.resmem)

  @property
  def gate(self) -> dict | None:
    """The opt-in gate's decision (``fit(..., gate_alpha=0.05)``), or None. ResMem's predictions
    memorize whatever it says; a gated deployment serves the base model where ``gate["memorize"]``
    is False."""
    return self.choice.gate

  def _rows(self, data, progress: bool = False):
    splits = user.UserSplits({"data": data})
    passes = fitting.Passes(splits, self.base, self.batch_size, progress)
    forward = passes.forward(with_logits=True)
    rows = fitting.chunk_rows(self.base.num_classes, high=16384)
    return passes, inference.rechunk(passes.rows("data", forward), rows)

  def _predictions(self, inputs):
    inputs = np.asarray(inputs)
    if inputs.ndim == 0:
      raise ValueError(f"inputs must be an array with one row per example, got a scalar {inputs!r}")
    if inputs.shape[0] == 0:  # no examples: no predictions (the pass needs at least one row)
      return [np.zeros((0, self.base.num_classes), np.float32)] * 3
    labels = np.zeros(inputs.shape[:1], np.int32)  # not used: predictions only
    _, chunks = self._rows((inputs, labels))
    parts = [fitting.predict_rows(self.memory, self.choice, chunk) for chunk in chunks]
    return [np.concatenate([np.asarray(p[i]) for p in parts]) for i in range(3)]

  def predict_scores(self, inputs) -> np.ndarray:
    """ResMem's vector ``p + r`` per example."""
    return self._predictions(inputs)[1]

  def predict(self, inputs) -> np.ndarray:
    """ResMem's class per example: ``argmax(p + r)``."""
    return np.argmax(self.predict_scores(inputs), axis=-1)

  def predict_proba(self, inputs) -> np.ndarray:
    """ResMem's probability output per example: rows sum to 1 and each row's argmax is
    :meth:`predict`'s class (``core/predictor.py: resmem_probabilities``)."""
    return self._predictions(inputs)[2]

  def evaluate(self, inputs, labels=None, *, progress: bool = False) -> dict:
    """Base and ResMem accuracy, squared loss, log loss on ``(inputs, labels)`` (or a split as
    :func:`fit` takes), and ``comparison``: the paired bootstrap interval and McNemar test."""
    data = inputs if labels is None else (np.asarray(inputs), np.asarray(labels))
    # Labels are checked against the model's classes where they enter (arrays at once).
    splits = user.UserSplits({"test": data}, num_classes=self.base.num_classes)
    passes = fitting.Passes(splits, self.base, self.batch_size, progress)
    out = fitting.evaluate(passes, self.memory, self.choice, "test")
    result = {head: out[head] for head in ("base", "resmem", "knnlm") if head in out}
    result["rows"] = out["rows"]
    result["comparison"] = metrics.paired_comparison(out["hits"]["resmem"], out["hits"]["base"])
    return result

  def save(self, path: str | os.PathLike) -> None:
    """The memory and what was chosen, in folder ``path`` (the model's variables are not saved:
    :meth:`load` takes them and checks they are the ones this memory was built from).

    ``path/memory`` and ``path/resmem.json`` are written into one new folder swapped in at once: a
    kill at any write leaves the earlier save or this one, never a mix. ``resmem.json`` names the
    memory's manifest digest, the variables' digest and the model's architecture, all checked by
    :meth:`load`. ``path`` must be missing, an empty folder or an earlier ResMem save; a folder
    holding anything else is refused (ValueError) and left untouched.
    """
    from resmem_jax.memory import atomic_dir  # pylint: disable=g-import-not-at-top
    from resmem_jax.memory import io as memory_io  # pylint: disable=g-import-not-at-top
    path = os.path.abspath(os.fspath(path))

    def write(folder):
      memory_dir = os.path.join(folder, MEMORY_DIR)
      self.memory.save(memory_dir)
      architecture = model_architecture(self.base.apply_fn)
      state = {
          "format_version": SAVE_VERSION,
          "choice": self.choice.to_json(),
          "settings": settings_lib.json_ready(dataclasses.asdict(self.settings)),
          "model_digest": self.base.digest, "num_classes": self.base.num_classes,
          "model_architecture": architecture,
          "model_architecture_sha256": hashlib.sha256(architecture.encode()).hexdigest(),
          "memory_manifest_sha256": memory_io.manifest_digest(memory_dir),
          "batch_size": self.batch_size, "tuning": self.tuning}
      with open(os.path.join(folder, STATE_FILE), "w") as f:  # last: it completes the save
        json.dump(state, f, indent=2, sort_keys=True)

    atomic_dir.replace_folder(path, write, _check_save_replaceable, _save_complete)

  @classmethod
  def load(cls, path: str | os.PathLike, model, variables=None) -> "ResMem":
    """A saved ResMem for ``model`` / ``variables``; ValueError unless they are the model the
    memory was built from (the variables' content digest and the model's architecture: a Linen
    module's class and fields, an NNX graph definition, a function's name) and unless the memory
    beside ``resmem.json`` is the one it names (its manifest digest)."""
    from resmem_jax import memory as memory_lib  # pylint: disable=g-import-not-at-top
    from resmem_jax.memory import atomic_dir  # pylint: disable=g-import-not-at-top
    from resmem_jax.memory import io as memory_io  # pylint: disable=g-import-not-at-top
    from resmem_jax.training import provenance  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(os.path.abspath(os.fspath(path)))
    if not os.path.lexists(path) and atomic_dir.interrupted(path):
      atomic_dir.restore(path, _save_complete)  # a save killed between its two renames
    with atomic_dir.reading(path):
      try:
        state = _read_save_state(path)
        choice = fitting.Choice.from_json(state["choice"])
        saved: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                 for k, v in state["settings"].items()}
        settings = settings_lib.ResMemSettings(**saved)
      except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path / STATE_FILE} cannot be read ({err}); save the ResMem "
                         "again") from None
      apply_fn, variables = apply_function(model, variables)
      digest = provenance.variables_digest(variables)
      if digest != state["model_digest"]:
        raise ValueError(f"the memory in {path} was built from another model (content digest "
                         f"{str(state['model_digest'])[:12]}..., these variables {digest[:12]}...): "
                         "load it with the model it was fitted for, or fit again")
      older = state.get("format_version") is None
      if older:
        logging.getLogger("resmem_jax").warning(
            "%s was saved by an older resmem_jax: its memory, state and model architecture "
            "cannot be cross-checked; save it again to have them checked", path)
        memory = memory_lib.load_memory(path / MEMORY_DIR)
      else:
        architecture = model_architecture(apply_fn)
        if (hashlib.sha256(architecture.encode()).hexdigest()
            != state.get("model_architecture_sha256")):
          raise ValueError(
              f"the memory in {path} was built from another model architecture "
              f"({_difference(str(state.get('model_architecture')), architecture)}): load it "
              "with the model it was fitted for, or fit again")
        try:
          parts, manifest = memory_io.read(path / MEMORY_DIR)
        except FileNotFoundError as err:
          raise ValueError(f"{err}; save the ResMem again") from None
        if manifest != state.get("memory_manifest_sha256"):
          raise ValueError(
              f"the memory in {path / MEMORY_DIR} is not the one {path / STATE_FILE} names "
              f"(manifest digest {manifest[:12]}..., recorded "
              f"{str(state.get('memory_manifest_sha256'))[:12]}...): it was replaced or copied "
              "from another save; save the ResMem again")
        keys, labels, store, backend, index, metadata = parts
        memory = memory_lib.Memory(keys, store, backend, index, labels, metadata)
    from resmem_jax import models  # pylint: disable=g-import-not-at-top
    base = fitting.BaseModel(
        apply_fn=apply_fn, variables=mesh_lib.replicate(variables, mesh_lib.data_mesh()), step=0,
        digest=digest, num_params=models.count_params(variables),
        num_classes=int(state["num_classes"]))
    return cls(memory=memory, choice=choice, settings=settings,
               base=base, batch_size=int(state["batch_size"]), tuning=state.get("tuning"))


# -- ResMem.save's folder: one unit, cross-checked ------------------------------------------------
# 2: memory/ and resmem.json swapped in as one folder; resmem.json names the memory's manifest
# digest and the model's architecture. Older saves (no format_version) load unchecked.
SAVE_VERSION = 2
_SAVE_FIELDS = ("choice", "settings", "model_digest", "num_classes", "batch_size")


def _read_save_state(path) -> dict:
  from resmem_jax.memory import io as memory_io  # pylint: disable=g-import-not-at-top
  with memory_io._open_regular(os.path.join(path, STATE_FILE)) as f:  # pylint: disable=protected-access
    state = jsonio.loads(f.read())
  if not isinstance(state, dict) or any(name not in state for name in _SAVE_FIELDS):
    raise ValueError(f"it is not a ResMem save's state (it lacks {', '.join(_SAVE_FIELDS)})")
  version = state.get("format_version")
  if version not in (None, SAVE_VERSION):
    raise ValueError(f"format_version {version!r}, this code reads {SAVE_VERSION}")
  return state


def _save_complete(folder) -> bool:
  """Whether ``folder`` is a whole ResMem save (what a killed save's copy must be to be put back)."""
  from resmem_jax.memory import io as memory_io  # pylint: disable=g-import-not-at-top
  try:
    state = _read_save_state(folder)
    memory_dir = os.path.join(folder, MEMORY_DIR)
    return (state.get("format_version") == SAVE_VERSION and memory_io.is_complete(memory_dir)
            and memory_io.manifest_digest(memory_dir) == state.get("memory_manifest_sha256"))
  except (OSError, ValueError):
    return False


def _check_save_replaceable(path: str) -> None:
  """ValueError unless ``path`` is missing, an empty folder or an earlier ResMem save (its state
  readable as one, its memory a saved memory, nothing else in it)."""
  from resmem_jax.memory import atomic_dir  # pylint: disable=g-import-not-at-top
  from resmem_jax.memory import io as memory_io  # pylint: disable=g-import-not-at-top
  if not os.path.lexists(path):
    return
  if os.path.islink(path) or not os.path.isdir(path):
    raise ValueError(f"cannot save a ResMem to {path}: it is a "
                     f"{'symbolic link' if os.path.islink(path) else 'file'}, not a folder; "
                     "choose another path")
  names = sorted(os.listdir(path))
  if not names:
    return
  memory_dir = os.path.join(path, MEMORY_DIR)
  foreign = [name for name in names if name not in (STATE_FILE, MEMORY_DIR)
             and not atomic_dir.is_own_entry(memory_dir, name)]
  ours = not foreign and STATE_FILE in names
  if ours:
    try:
      _read_save_state(path)
    except (OSError, ValueError):
      ours = False
  if ours and MEMORY_DIR in names:
    ours = not os.path.islink(memory_dir) and memory_io.is_saved_memory(memory_dir)
  if not ours:
    shown = ", ".join((foreign or names)[:3]) + (", ..." if len(foreign or names) > 3 else "")
    raise ValueError(f"cannot save a ResMem to {path}: the folder holds {shown}, which no earlier "
                     "ResMem.save wrote; save to a new or empty folder")


def model_architecture(apply_fn) -> str:
  """A description of the model behind ``apply_fn`` (as :func:`apply_function` returns it) that
  is the same in every process: a Linen module's class and fields (submodules, activations,
  widths), an NNX module's graph definition, else the function's name. Memory addresses are left
  out. What a module's code does beyond its fields is not seen."""
  code = getattr(apply_fn, "__code__", None)
  if code is not None and getattr(apply_fn, "__module__", None) == __name__ and apply_fn.__closure__:
    captured = dict(zip(code.co_freevars, (c.cell_contents for c in apply_fn.__closure__), strict=True))
    if "graphdef" in captured:
      return "nnx:" + _ADDRESS.sub("", repr(captured["graphdef"]))
    if "model" in captured:
      return _describe(captured["model"])
  return _describe(apply_fn)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(value, depth: int = 0) -> str:
  if depth > 30:
    return "..."
  if value is None or isinstance(value, (bool, int, float, str, bytes)):
    return repr(value)
  if isinstance(value, (list, tuple)):
    inner = ", ".join(_describe(v, depth + 1) for v in value)
    return f"[{inner}]" if isinstance(value, list) else f"({inner})"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{k!r}: {_describe(v, depth + 1)}"
                           for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))) + "}"
  if isinstance(value, functools.partial):
    return (f"partial({_describe(value.func, depth + 1)}, {_describe(value.args, depth + 1)}, "
            f"{_describe(value.keywords, depth + 1)})")
  if isinstance(value, type):
    return value.__qualname__
  if isinstance(value, np.dtype):
    return str(value)
  if dataclasses.is_dataclass(value):  # a Linen module and its submodules are dataclasses
    fields = [f.name for f in dataclasses.fields(value) if f.name not in ("parent", "name")]
    inner = ", ".join(f"{n}={_describe(getattr(value, n, None), depth + 1)}" for n in fields)
    return f"{type(value).__qualname__}({inner})"
  for attribute in ("fun", "__wrapped__"):  # jax.custom_jvp (relu), jit-wrapped functions
    wrapped = getattr(value, attribute, None)
    if callable(wrapped) and wrapped is not value:
      return _describe(wrapped, depth + 1)
  if callable(value) and hasattr(value, "__qualname__"):
    return value.__qualname__
  return f"{type(value).__qualname__}:{_ADDRESS.sub('', repr(value))}"


def _difference(saved: str, current: str, context: int = 40) -> str:
  """Where two descriptions first differ: "saved ...X..., this model ...Y..."."""
  first = next((i for i, (a, b) in enumerate(zip(saved, current, strict=False)) if a != b),
               min(len(saved), len(current)))
  start = max(0, first - context)

  def cut(text):
    return ("..." if start else "") + text[start:first + context] + (
        "..." if len(text) > first + context else "")

  return f"saved {cut(saved)}, this model {cut(current)}"
