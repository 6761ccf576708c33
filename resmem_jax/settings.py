"""Typed settings: the config is read once, checked before anything slow starts, defaults here.

A binary's ml_collections config (``experiments/configs/*.py``) starts from :func:`default_config`,
which is built from the dataclasses below, so every field and its default live in one place.
:func:`from_config` turns a (possibly overridden) ConfigDict into frozen :class:`Settings`,
rejecting unknown fields and invalid values with one line that names the field and what it
accepts. :func:`check` then asks the registries (data sets, models, memory backends) about the
names, still without reading data or training anything. Library functions take the settings
section they need (``settings.train``, ``settings.resmem``, ...), never the whole config.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Optional

SIGMA_GRID = tuple(round(0.01 * 10 ** (i / 4), 6) for i in range(17))  # 0.01 .. 100, ratio 1.78
SELECT_BY = ("squared_loss", "accuracy", "log_loss")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DTYPES = ("float32", "bfloat16", "float16")


class SettingsError(ValueError):
  """A config field has an unknown name or an invalid value (the message names the field)."""


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Where examples come from (``resmem_jax.data``)."""
  name: str = "digits"  # built-in set, any TFDS image classification set, or a text set
  data_dir: Optional[str] = None  # TFDS data_dir: where prepared data sets live (None: TFDS default)
  manual_dir: Optional[str] = None  # archives TFDS prepares from offline (None: TFDS default)
  val_fraction: float = 0.1  # validation carved from the training split (fixed permutation)
  train_fraction: float = 1.0  # keep this fraction of the remaining training examples
  split_seed: int = 0  # seed of the validation / train_fraction permutations
  augment: bool = False  # random crops (and flips where label preserving) while training
  image_size: Optional[int] = None  # resize images to this side (needed for variable-size sets)
  seq_len: int = 128  # text: tokens per sequence
  max_split_tokens: Optional[int] = None  # text: keep only the first N tokens of every split
  vocab_size: int = 8192  # subword text: target vocabulary size
  vocab_documents: int = 10000  # subword text: documents the vocabulary is built from
  vocab_dir: Optional[str] = None  # subword text: where the vocabulary is saved (None: data_dir)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """The base network (``resmem_jax.models``); each model reads the fields it needs."""
  name: str = "mlp"  # mlp | cnn | cifar_resnet | resnet | transformer
  width: float = 256.0  # units / channels (mlp, cnn, transformer) or a multiplier (resnets)
  depth: int = 2  # hidden layers, conv blocks, 6n+2 (cifar_resnet), 18/34/50/101, blocks
  embed_dim: int = 128  # cnn: size of the dense embedding layer
  conv_impl: str = "xla"  # resnets: "xla" (native convolutions) or "im2col" (as matmuls)
  num_heads: int = 4  # transformer
  max_len: int = 128  # transformer: longest sequence
  mlp_ratio: int = 4  # transformer: MLP width / model width
  dropout_rate: float = 0.0  # transformer


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """Training the base network (``resmem_jax.training``)."""
  num_epochs: float = 10.0  # fractional epochs allowed
  num_steps: int = -1  # > 0 overrides num_epochs
  batch_size: int = 128  # global batch, split over all devices
  eval_batch_size: int = 512
  optimizer: str = "sgd"  # sgd | adam | adamw
  learning_rate: float = 0.1
  momentum: float = 0.9  # sgd; 0: plain SGD
  nesterov: bool = False
  b1: float = 0.9  # adam / adamw
  b2: float = 0.999
  weight_decay: float = 5e-4  # on kernels only (not biases or norm scales)
  schedule: str = "cosine"  # cosine | step | constant (after a linear warm-up)
  warmup_epochs: float = 0.0
  step_boundaries: tuple[float, ...] = (0.5, 0.75)  # step: fractions of training where lr drops
  step_factor: float = 0.1
  label_smoothing: float = 0.0
  grad_clip_norm: float = 0.0  # 0: no clipping
  dtype: str = "float32"  # compute dtype (parameters stay float32); bfloat16 on accelerators
  log_every_steps: int = 50
  eval_every_steps: int = 0  # 0: once per epoch
  checkpoint_every_steps: int = 500
  max_checkpoints_to_keep: int = 3
  eval_test_at_end: bool = True
  distributed: Optional[bool] = None  # None: detect a multi-host launch from the environment


@dataclasses.dataclass(frozen=True)
class ResMemSettings:
  """The memory, the selection of k / sigma / T on validation, and evaluation (``resmem_jax.jobs``).

  ``k``, ``sigma`` and ``temperature`` left as None are chosen on the validation split from the
  grids by ``select_by``. With ``sigma_relative`` the ``sigma_grid`` values are multiples of the
  median distance from a validation row to its nearest memory key (embedding distances have no
  natural unit); a fixed ``sigma`` is absolute.
  """
  backend: str = "scann"  # exact | scann (resmem_jax/memory)
  backend_options: str = ""  # "key=value,..." for the backend, e.g. "mode=tree_ah,num_leaves=400"
  residual_format: str = "dense"  # dense | bfloat16 | sparse (label + top_m probabilities)
  top_m: int = 16  # sparse: entries kept besides the label
  k: Optional[int] = None
  sigma: Optional[float] = None
  temperature: Optional[float] = None
  k_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
  sigma_grid: tuple[float, ...] = SIGMA_GRID
  sigma_relative: bool = True
  temperature_grid: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
  select_by: str = "squared_loss"  # squared_loss | accuracy | log_loss (on validation)
  # ResMem's probability output (1 - mix) * normalize(max(p + r, 0)) + mix * p_base: the mix is
  # chosen on validation log loss (1: the base model itself); base_mix fixes it.
  base_mix: Optional[float] = None
  base_mix_grid: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
  # Keep the base model (no memory) when no grid point beats it on validation by select_by.
  decline_if_no_gain: bool = True
  knnlm: bool = False  # also report kNN-LM (the neighbours' labels mixed into p) beside ResMem
  knn_lambda: Optional[float] = None  # kNN-LM mixture weight; None: chosen on validation
  knn_lambda_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
  eval_batch_size: int = 1024  # examples (sequences) per inference batch
  max_validation_rows: Optional[int] = None  # use at most this many validation rows to select
  evaluate_train: bool = True  # also report training-split accuracy (memorization)
  timing_repeats: int = 3  # prediction-cost figure: fastest of this many timed test passes
  tune_recall: Optional[float] = None  # scann (partitioned): tune query settings to this recall@k


@dataclasses.dataclass(frozen=True)
class Settings:
  seed: int = 0
  data: DataSettings = DataSettings()
  model: ModelSettings = ModelSettings()
  train: TrainSettings = TrainSettings()
  resmem: ResMemSettings = ResMemSettings()


SECTIONS = {"data": DataSettings, "model": ModelSettings, "train": TrainSettings,
            "resmem": ResMemSettings}


# ----------------------------------------------------------------------------- config <-> settings


def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


def _is_optional(hint) -> tuple[bool, Any]:
  if typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint):
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    return True, inner[0]
  return False, hint


def default_config():
  """An ml_collections ConfigDict with every field at its default (None fields typed)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict()
  cfg.seed = Settings.seed
  for section, cls in SECTIONS.items():
    sub = ml_collections.ConfigDict()
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
      optional, inner = _is_optional(hints[field.name])
      if field.default is None:
        sub[field.name] = config_dict.placeholder(inner)
      else:
        sub[field.name] = field.default
    cfg[section] = sub
  return cfg


def _suggest(name: str, choices) -> str:
  close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(path: str, value, hint):
  """``value`` as the field's type, or SettingsError naming ``path``."""
  optional, inner = _is_optional(hint)
  if value is None:
    if optional:
      return None
    raise SettingsError(f"{path} must be set (got None)")
  origin = typing.get_origin(inner)
  if origin is tuple:
    element = typing.get_args(inner)[0]
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
      raise SettingsError(f"{path} must be a list of values, got {value!r}")
    return tuple(_convert(f"{path}[{i}]", v, element) for i, v in enumerate(value))
  if inner is bool:
    if not isinstance(value, bool):
      raise SettingsError(f"{path} must be True or False, got {value!r}")
    return value
  if inner is int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
      raise SettingsError(f"{path} must be an integer, got {value!r}")
    return int(value)
  if inner is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise SettingsError(f"{path} must be a number, got {value!r}")
    return float(value)
  if inner is str:
    if not isinstance(value, str):
      raise SettingsError(f"{path} must be a string, got {value!r}")
    return value
  raise TypeError(f"unsupported settings type {hint} for {path}")


def unknown_field_message(path: str) -> str:
  """``unknown config field <path> (did you mean ...?); <section> fields are: ...``."""
  section, _, name = path.rpartition(".")
  if section in SECTIONS:
    fields = sorted(f.name for f in dataclasses.fields(SECTIONS[section]))
    return (f"unknown config field {path}{_suggest(name, fields)}; {section} fields are: "
            f"{', '.join(fields)}")
  known = ["seed"] + sorted(SECTIONS)
  return (f"unknown config field {path}{_suggest(path.split('.')[0], known)}; top-level fields "
          f"are: {', '.join(known)}")


def _section(cls, path: str, values: dict):
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise SettingsError(unknown_field_message(f"{path}.{unknown[0]}"))
  hints = _hints(cls)
  return cls(**{name: _convert(f"{path}.{name}", value, hints[name])
                for name, value in values.items()})


def from_config(config) -> Settings:
  """Typed, checked :class:`Settings` from a ConfigDict / dict; raises SettingsError."""
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  unknown = sorted(set(values) - ({"seed"} | set(SECTIONS)))
  if unknown:
    raise SettingsError(unknown_field_message(unknown[0]))
  sections = {}
  for section, cls in SECTIONS.items():
    given = values.get(section) or {}
    if not isinstance(given, dict):
      raise SettingsError(f"config.{section} must be a section of fields, got {given!r}")
    sections[section] = _section(cls, section, given)
  seed = _convert("seed", values.get("seed", 0), int)
  settings = Settings(seed=seed, **sections)
  validate_values(settings)
  return settings


def to_dict(settings: Settings) -> dict:
  """Plain JSON-ready dict of every field (tuples become lists)."""
  return json_ready(dataclasses.asdict(settings))


def json_ready(value):
  if isinstance(value, dict):
    return {k: json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  return value


def replace_field(settings: Settings, path: str, value) -> Settings:
  """A copy with ``path`` (e.g. ``"model.width"``, ``"seed"``) set to ``value``, checked."""
  parts = path.split(".")
  if parts == ["seed"]:
    new = dataclasses.replace(settings, seed=_convert("seed", value, int))
  else:
    if len(parts) != 2 or parts[0] not in SECTIONS:
      raise SettingsError(f"{path!r} is not a settings field; use <section>.<field> with a section "
                          f"in {sorted(SECTIONS)}")
    section, name = parts
    cls = SECTIONS[section]
    hints = _hints(cls)
    if name not in hints:
      raise SettingsError(f"unknown config field {path}{_suggest(name, hints)}")
    sub = dataclasses.replace(getattr(settings, section), **{name: _convert(path, value, hints[name])})
    new = dataclasses.replace(settings, **{section: sub})
  validate_values(new)
  return new


# ----------------------------------------------------------------------------- value checks


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise SettingsError(message)


def _choice(path: str, value: str, choices) -> None:
  if value not in choices:
    raise SettingsError(f"{path}={value!r} is not one of {', '.join(map(repr, choices))}"
                        f"{_suggest(value, choices)}")


def _positive(path: str, value, allow_none: bool = False, integer: bool = False) -> None:
  if value is None and allow_none:
    return
  ok = value is not None and math.isfinite(value) and value > 0
  _require(ok, f"{path} must be a positive {'integer' if integer else 'finite number'}, got {value!r}")


def _grid(path: str, values, integer: bool = False, high: float | None = None) -> None:
  _require(len(values) > 0, f"{path} is empty; give at least one value")
  for v in values:
    ok = math.isfinite(v) and v > 0 and (high is None or v <= high)
    bound = f"in (0, {high}]" if high is not None else "> 0"
    _require(ok, f"{path} values must be {'integers ' if integer else ''}{bound}, got {values!r}")


def validate_values(settings: Settings) -> None:
  """Ranges and fixed choices of every field (no registry lookups; see :func:`check`)."""
  d, m, t, r = settings.data, settings.model, settings.train, settings.resmem
  _require(0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
  _require(0.0 < d.train_fraction <= 1.0,
           f"data.train_fraction must be in (0, 1], got {d.train_fraction}")
  _positive("data.image_size", d.image_size, allow_none=True, integer=True)
  _positive("data.seq_len", d.seq_len, integer=True)
  _require(d.max_split_tokens is None or d.max_split_tokens >= 2,
           f"data.max_split_tokens must be >= 2 or None, got {d.max_split_tokens}")
  _require(d.vocab_size >= 256, f"data.vocab_size must be >= 256, got {d.vocab_size}")
  _positive("data.vocab_documents", d.vocab_documents, integer=True)

  _positive("model.width", m.width)
  _require(m.depth >= 1, f"model.depth must be >= 1, got {m.depth}")
  _choice("model.conv_impl", m.conv_impl, ("xla", "im2col"))
  _require(0.0 <= m.dropout_rate < 1.0, f"model.dropout_rate must be in [0, 1), got {m.dropout_rate}")

  _require(t.num_steps > 0 or t.num_epochs > 0,
           f"train.num_epochs (or train.num_steps) must be positive, got {t.num_epochs} / {t.num_steps}")
  _positive("train.batch_size", t.batch_size, integer=True)
  _positive("train.eval_batch_size", t.eval_batch_size, integer=True)
  _choice("train.optimizer", t.optimizer, OPTIMIZERS)
  _choice("train.schedule", t.schedule, SCHEDULES)
  _choice("train.dtype", t.dtype, DTYPES)
  _positive("train.learning_rate", t.learning_rate)
  _require(0.0 <= t.momentum < 1.0, f"train.momentum must be in [0, 1), got {t.momentum}")
  _require(0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0, f"train.b1 and train.b2 must be in [0, 1)")
  _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
  _require(t.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {t.warmup_epochs}")
  _require(all(0 < b < 1 for b in t.step_boundaries),
           f"train.step_boundaries must lie in (0, 1), got {t.step_boundaries}")
  _require(0 <= t.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
  _require(t.grad_clip_norm >= 0, f"train.grad_clip_norm must be >= 0, got {t.grad_clip_norm}")
  for name in ("log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep"):
    _positive(f"train.{name}", getattr(t, name), integer=True)
  _require(t.eval_every_steps >= 0, f"train.eval_every_steps must be >= 0, got {t.eval_every_steps}")

  _choice("resmem.select_by", r.select_by, SELECT_BY)
  _positive("resmem.top_m", r.top_m, integer=True)
  _positive("resmem.k", r.k, allow_none=True, integer=True)
  _positive("resmem.sigma", r.sigma, allow_none=True)
  _positive("resmem.temperature", r.temperature, allow_none=True)
  _grid("resmem.k_grid", r.k_grid, integer=True)
  _grid("resmem.sigma_grid", r.sigma_grid)
  _grid("resmem.temperature_grid", r.temperature_grid)
  _grid("resmem.knn_lambda_grid", r.knn_lambda_grid, high=1.0)
  _require(len(r.base_mix_grid) > 0 and all(0 <= v <= 1 for v in r.base_mix_grid),
           f"resmem.base_mix_grid values must lie in [0, 1], got {r.base_mix_grid}")
  _require(r.base_mix is None or 0 <= r.base_mix <= 1,
           f"resmem.base_mix must be in [0, 1] or None, got {r.base_mix}")
  _require(r.knn_lambda is None or 0 < r.knn_lambda <= 1,
           f"resmem.knn_lambda must be in (0, 1] or None, got {r.knn_lambda}")
  _positive("resmem.eval_batch_size", r.eval_batch_size, integer=True)
  _positive("resmem.max_validation_rows", r.max_validation_rows, allow_none=True, integer=True)
  _positive("resmem.timing_repeats", r.timing_repeats, integer=True)
  _require(r.tune_recall is None or 0 < r.tune_recall <= 1,
           f"resmem.tune_recall must be in (0, 1] or None, got {r.tune_recall}")


def check(settings: Settings) -> None:
  """Registry names and per-component options, still without data or training (seconds).

  The data set name, the model (built without parameters), the memory backend, its options and
  the residual format. Raises SettingsError.
  """
  from resmem_jax import data  # pylint: disable=g-import-not-at-top
  from resmem_jax import memory  # pylint: disable=g-import-not-at-top
  from resmem_jax import models  # pylint: disable=g-import-not-at-top
  try:
    data.check_name(settings.data.name)
    models.check_settings(settings.model)
    memory.check_options(settings.resmem.backend, settings.resmem.backend_options,
                         settings.resmem.residual_format)
  except SettingsError:
    raise
  except ValueError as err:
    raise SettingsError(str(err)) from None
  r = settings.resmem
  if r.tune_recall is not None and r.backend != "scann":
    raise SettingsError(f"resmem.tune_recall tunes ScaNN's query settings; resmem.backend is "
                        f"{r.backend!r} (set resmem.backend=scann or unset resmem.tune_recall)")
  if settings.data.val_fraction == 0 and needs_validation(r):
    raise SettingsError("choosing k, sigma and temperature needs a validation split: set "
                        "data.val_fraction > 0, or fix resmem.k, resmem.sigma, resmem.temperature"
                        ", resmem.base_mix (and resmem.knn_lambda when resmem.knnlm is on)")


def needs_validation(r: ResMemSettings) -> bool:
  """Whether anything is left to choose on the validation split."""
  resmem_fixed = (r.k is not None and r.sigma is not None and r.temperature is not None
                  and r.base_mix is not None)
  knn_fixed = not r.knnlm or r.knn_lambda is not None
  return not (resmem_fixed and knn_fixed) or r.tune_recall is not None
