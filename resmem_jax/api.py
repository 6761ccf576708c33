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
(:mod:`resmem_jax.jobs.engine`): one masked, jitted inference pass over the training data, the
memory, the choice of k, sigma, T (and the probability output's mix) on validation, so the tool and
a notebook give the same numbers for the same model and data.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import pathlib
from typing import Any, Callable

import jax
import numpy as np

from resmem_jax import inference
from resmem_jax import jsonio
from resmem_jax import mesh as mesh_lib
from resmem_jax import settings as settings_lib
from resmem_jax.core import metrics
from resmem_jax.data import user
from resmem_jax.jobs import engine

STATE_FILE = "resmem.json"
MEMORY_DIR = "memory"


def apply_function(model, variables) -> tuple[Callable, Any]:
  """``(apply(variables, inputs) -> (logits, embedding), variables)`` for any supported model."""
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:  # an older flax without NNX
    nnx = None
  if nnx is not None and isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError("an NNX module holds its own state: pass variables=None")
    graphdef, state = nnx.split(model)

    def apply_nnx(state, inputs):
      module = nnx.merge(graphdef, state)
      module.eval()  # dropout off, batch norm on its running averages
      return module(inputs)

    return apply_nnx, state
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  if isinstance(model, nn.Module):
    if variables is None:
      raise ValueError("a Linen module needs its variables (the dict module.init returned)")
    params = inspect.signature(type(model).__call__).parameters
    kwargs = {"train": False} if "train" in params else (
        {"deterministic": True} if "deterministic" in params else {})
    return (lambda v, x: model.apply(v, x, **kwargs)), variables
  if callable(model):
    if variables is None:
      return (lambda _, x: model(x)), {}
    return model, variables
  raise ValueError(f"model must be a Flax Linen or NNX module or a function returning (logits, "
                   f"embedding), got {type(model).__name__}")


def _resmem_settings(options: dict) -> settings_lib.ResMemSettings:
  defaults = {"backend": "exact", "evaluate_train": False, "timing_repeats": 1}
  for name in options:
    if f"resmem.{name}" in settings_lib.REMOVED_FIELDS:
      raise ValueError(settings_lib.REMOVED_FIELDS[f"resmem.{name}"].replace("resmem.", ""))
  try:
    r = settings_lib.ResMemSettings(**{**defaults, **options})
  except TypeError as err:
    names = [f.name for f in dataclasses.fields(settings_lib.ResMemSettings)]
    raise ValueError(f"{err}; fit() takes the resmem settings as keywords: {', '.join(names)}"
                     ) from None
  settings_lib.validate_values(dataclasses.replace(settings_lib.Settings(), resmem=r))
  from resmem_jax import memory  # pylint: disable=g-import-not-at-top
  memory.check_options(r.backend, r.backend_options, r.residual_format)
  return r


def _base_model(apply_fn, variables, splits: user.UserSplits,
                batch_size: int) -> tuple[engine.BaseModel, int]:
  """The model on the mesh (its class count from one forward pass over a first batch) and the
  rows per example (a label per token: the sequence length)."""
  from resmem_jax import models  # pylint: disable=g-import-not-at-top
  from resmem_jax.training import provenance  # pylint: disable=g-import-not-at-top
  first = next(iter(splits.eval_batches("train", 1)))
  logits, embedding = jax.eval_shape(apply_fn, variables, first["inputs"])
  if logits.shape[:-1] != first["labels"].shape or embedding.shape[:-1] != first["labels"].shape:
    raise ValueError(f"the model returned logits {logits.shape} and embedding {embedding.shape} "
                     f"for inputs {first['inputs'].shape} with labels {first['labels'].shape}; it "
                     "must return (logits [..., classes], embedding [..., dim]) with the labels' "
                     "leading shape")
  mesh = mesh_lib.data_mesh()
  return engine.BaseModel(
      apply_fn=apply_fn, variables=mesh_lib.replicate(variables, mesh), step=0,
      digest=provenance.variables_digest(variables), num_params=models.count_params(variables),
      num_classes=int(logits.shape[-1])), int(np.prod(first["labels"].shape[1:], dtype=np.int64))


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
  apply_fn, variables = apply_function(model, variables)
  splits = user.UserSplits({"train": train, "validation": validation})
  base, rows_per_example = _base_model(apply_fn, variables, splits, batch_size)
  passes = engine.Passes(splits, base, batch_size, progress, fold_block=rows_per_example)
  memory, choice, tuning = engine.build_and_select(r, passes, "user data")
  return ResMem(memory=memory, choice=choice, settings=r, base=base, batch_size=batch_size,
                tuning=tuning)


@dataclasses.dataclass
class ResMem:
  """A base model with its fitted memory: predictions, evaluation, save and load."""
  memory: Any
  choice: engine.Choice
  settings: settings_lib.ResMemSettings
  base: engine.BaseModel
  batch_size: int = 1024
  tuning: dict | None = None

  @property
  def hparams(self) -> dict:
    """What was chosen: ``k``, ``sigma``, ``temperature``, ``base_mix`` and their validation
    scores."""
    return dict(self.choice.resmem)

  @property
  def gate(self) -> dict | None:
    """The opt-in gate's decision (``fit(..., gate_alpha=0.05)``), or None. ResMem's predictions
    memorize whatever it says; a gated deployment serves the base model where ``gate["memorize"]``
    is False."""
    return self.choice.gate

  def _rows(self, data, progress: bool = False):
    splits = user.UserSplits({"data": data})
    passes = engine.Passes(splits, self.base, self.batch_size, progress)
    forward = passes.forward(with_logits=True)
    rows = engine.chunk_rows(self.base.num_classes, high=16384)
    return passes, inference.rechunk(passes.rows("data", forward), rows)

  def _predictions(self, inputs):
    labels = np.zeros(np.shape(inputs)[:1], np.int32)  # not used: predictions only
    _, chunks = self._rows((np.asarray(inputs), labels))
    parts = [engine.predict_rows(self.memory, self.choice, chunk) for chunk in chunks]
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
    splits = user.UserSplits({"test": data})
    passes = engine.Passes(splits, self.base, self.batch_size, progress)
    out = engine.evaluate(passes, self.memory, self.choice, self.settings, "test", timed=False)
    result = {head: out[head] for head in ("base", "resmem", "knnlm") if head in out}
    result["rows"] = out["rows"]
    result["comparison"] = metrics.paired_comparison(out["hits"]["resmem"], out["hits"]["base"])
    return result

  def save(self, path: str | os.PathLike) -> None:
    """The memory and what was chosen, in folder ``path`` (the model's variables are not saved:
    :meth:`load` takes them and checks they are the ones this memory was built from)."""
    path = pathlib.Path(path)
    self.memory.save(path / MEMORY_DIR)
    jsonio.write_json_atomic(path / STATE_FILE, {
        "choice": dataclasses.asdict(self.choice),
        "settings": settings_lib.json_ready(dataclasses.asdict(self.settings)),
        "model_digest": self.base.digest, "num_classes": self.base.num_classes,
        "batch_size": self.batch_size, "tuning": self.tuning})

  @classmethod
  def load(cls, path: str | os.PathLike, model, variables=None) -> "ResMem":
    """A saved ResMem for ``model`` / ``variables``; ValueError unless they are the same model
    (content digest) the memory was built from."""
    from resmem_jax import memory as memory_lib  # pylint: disable=g-import-not-at-top
    from resmem_jax.training import provenance  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(path)
    try:
      state = json.loads((path / STATE_FILE).read_text())
      choice = engine.Choice(**state["choice"])
      settings = settings_lib.ResMemSettings(**{
          k: tuple(v) if isinstance(v, list) else v for k, v in state["settings"].items()})
    except (OSError, ValueError, KeyError, TypeError) as err:
      raise ValueError(f"{path / STATE_FILE} cannot be read ({err}); save the ResMem again") from None
    apply_fn, variables = apply_function(model, variables)
    digest = provenance.variables_digest(variables)
    if digest != state["model_digest"]:
      raise ValueError(f"the memory in {path} was built from another model (content digest "
                       f"{state['model_digest'][:12]}..., these variables {digest[:12]}...): load "
                       "it with the model it was fitted for, or fit again")
    from resmem_jax import models  # pylint: disable=g-import-not-at-top
    base = engine.BaseModel(
        apply_fn=apply_fn, variables=mesh_lib.replicate(variables, mesh_lib.data_mesh()), step=0,
        digest=digest, num_params=models.count_params(variables),
        num_classes=int(state["num_classes"]))
    return cls(memory=memory_lib.load_memory(path / MEMORY_DIR), choice=choice, settings=settings,
               base=base, batch_size=int(state["batch_size"]), tuning=state.get("tuning"))
