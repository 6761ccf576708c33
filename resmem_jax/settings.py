"""Typed settings: the config is read once, checked before anything slow starts, defaults here.

A binary's ml_collections config (``resmem_jax/configs/*.py``) starts from :func:`default_config`,
which is built from the dataclasses below, so every field and its default live in one place.
:func:`from_config` turns a (possibly overridden) ConfigDict into frozen :class:`Settings`,
rejecting unknown fields and invalid values with one line that names the field and what it
accepts. Every field declares what it affects (``model`` | ``memory`` | ``report``, see
:data:`AFFECTS`); the workdir's record and the memory's signature are derived from that.
Checks that ask the registries (data sets, models, memory backends) live in
:mod:`resmem_jax.validate`, above them: this module imports no registry. Library functions take
the settings section they need (``settings.train``, ``settings.resmem``, ...), never the config.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Iterable, Optional

# The one "did you mean" helper (api.py's fit keywords call it by this name too).
from resmem_jax.suggest import did_you_mean as _suggest

SIGMA_GRID = tuple(round(0.01 * 10 ** (i / 4), 6) for i in range(17))  # 0.01 .. 100, ratio 1.78
SELECT_BY = ("squared_loss", "accuracy", "log_loss")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DTYPES = ("float32", "bfloat16", "float16")  # train.dtype; models maps each to its jnp dtype
CONV_IMPLS = ("xla", "im2col")  # model.conv_impl
CPU_COMPILER_OPTIONS = ("xla_default", "tuned")  # model.cpu_compiler_options
MAX_SEED = 2**31 - 1  # seed, data.split_seed: a 32-bit seed for every generator, with room for + 1


class SettingsError(ValueError):
  """A config field has an unknown name or an invalid value (the message names the field)."""


class MissingDependency(ImportError):
  """An optional package a setting needs is not installed (the message names the extra)."""


# What a field's value changes, declared by every field; provenance and the memory's signature
# are derived from it, so a new field cannot be left out of either:
#   model   the trained model: recorded in WORKDIR/run.json, a rerun that changes it is refused
#           (the memory is keyed by the model's digest, and lists these too);
#   memory  the memory or the choice of k / sigma / T, not the model: changes freely, and a rerun
#           rebuilds the memory;
#   report  neither: where data lives, batch sizes of passes, logging, checkpoints, processes,
#           what is reported.
AFFECTS = ("model", "memory", "report")


def _f(affects: str, default, help_text: str):
  """A settings field: what it affects (:data:`AFFECTS`), its default and its meaning (shown by
  ``--print_config`` and :func:`describe`)."""
  if affects not in AFFECTS:
    raise ValueError(f"affects={affects!r} is not one of {AFFECTS}")
  return dataclasses.field(default=default, metadata={"help": help_text, "affects": affects})


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Where examples come from (``resmem_jax.data``)."""
  name: str = _f("model", "digits", "data set: digits (embedded), any TFDS image classification "
                 "set (mnist, cifar10, svhn_cropped, emnist/letters, ...), imagenet2012, "
                 "tiny_shakespeare, lm1b, c4")
  data_dir: Optional[str] = _f("report", None, "TFDS data_dir: where prepared data sets live "
                               "(None: ~/tensorflow_datasets)")
  manual_dir: Optional[str] = _f("report", None, "a folder holding the archives TFDS downloads, "
                                 "to prepare offline (None: download)")
  val_fraction: float = _f("model", 0.1, "validation split carved from the training split (fixed "
                           "permutation); k, sigma, T are chosen on it")
  train_fraction: float = _f("model", 1.0, "keep this fraction of the remaining training examples "
                             "(nested: a smaller fraction is a subset)")
  split_seed: int = _f("model", 0, "seed of the validation / train_fraction permutations")
  augment: bool = _f("model", False, "random crops while training (and flips where they keep the "
                     "label)")
  image_size: Optional[int] = _f("model", None, "resize images to image_size x image_size (needed "
                                 "for sets of varying size; ImageNet: 224 when None)")
  seq_len: int = _f("model", 128, "text: tokens per sequence")
  max_split_tokens: Optional[int] = _f("model", None, "text: keep only the first N tokens of "
                                       "every split")
  vocab_size: int = _f("model", 8192, "subword text: target vocabulary size")
  vocab_documents: int = _f("model", 10000, "subword text: training documents the vocabulary is "
                            "built from")
  vocab_dir: Optional[str] = _f("report", None, "subword text: where the vocabulary is saved "
                                "(None: <data_dir>/resmem_vocab)")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """The base network (``resmem_jax.models``); each model reads the fields it needs."""
  name: str = _f("model", "mlp", "mlp | cnn | cifar_resnet | resnet | transformer")
  width: float = _f("model", 256.0, "hidden units (mlp), first block's channels (cnn), model "
                    "width (transformer), or a channel multiplier (resnets)")
  depth: int = _f("model", 2, "hidden layers (mlp), conv blocks (cnn), 6n+2 (cifar_resnet), "
                  "18/34/50/101 (resnet), blocks (transformer)")
  embed_dim: int = _f("model", 128, "cnn: size of the dense embedding layer (the memory key)")
  conv_impl: str = _f("model", "xla", "resnets: xla (native convolutions) or im2col (as matmuls)")
  cpu_compiler_options: str = _f("model", "xla_default", "convolutional models on CPU: "
                                 "xla_default, or tuned (compiler_options.py: 1.2-1.4x faster "
                                 "ResNet-20 steps, slower below about 20k parameters)")
  num_heads: int = _f("model", 4, "transformer: attention heads")
  max_len: int = _f("model", 128, "transformer: longest sequence")
  mlp_ratio: int = _f("model", 4, "transformer: MLP width / model width")
  dropout_rate: float = _f("model", 0.0, "transformer: dropout while training")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """Training the base network (``resmem_jax.training``)."""
  num_epochs: float = _f("model", 10.0, "training epochs (fractions allowed)")
  num_steps: int = _f("model", -1, "training steps; > 0 overrides num_epochs")
  batch_size: int = _f("model", 128, "global batch, split over all devices")
  eval_batch_size: int = _f("report", 512, "batch of the validation / test passes while training")
  optimizer: str = _f("model", "sgd", "sgd | adam | adamw")
  learning_rate: float = _f("model", 0.1, "peak learning rate")
  momentum: float = _f("model", 0.9, "sgd momentum (0: plain SGD)")
  nesterov: bool = _f("model", False, "sgd: Nesterov momentum")
  b1: float = _f("model", 0.9, "adam / adamw: first-moment decay")
  b2: float = _f("model", 0.999, "adam / adamw: second-moment decay")
  weight_decay: float = _f("model", 5e-4, "on kernels only (not biases or norm scales); coupled "
                           "for sgd and adam, decoupled for adamw")
  schedule: str = _f("model", "cosine", "cosine | step | constant, after a linear warm-up")
  warmup_epochs: float = _f("model", 0.0, "linear warm-up length in epochs")
  step_boundaries: tuple[float, ...] = _f("model", (0.5, 0.75), "step schedule: fractions of "
                                          "training where the learning rate drops")
  step_factor: float = _f("model", 0.1, "step schedule: factor of each drop")
  label_smoothing: float = _f("model", 0.0, "label smoothing of the training loss")
  grad_clip_norm: float = _f("model", 0.0, "clip gradients to this global norm (0: no clipping)")
  dtype: str = _f("model", "float32", "compute dtype (parameters stay float32): float32 | "
                  "bfloat16 | float16")
  log_every_steps: int = _f("report", 50, "training metrics every N steps (metrics.jsonl, "
                            "TensorBoard)")
  eval_every_steps: int = _f("report", 0, "validation every N steps (0: once per epoch)")
  checkpoint_every_steps: int = _f("report", 500, "checkpoint every N steps (and at the end)")
  max_checkpoints_to_keep: int = _f("report", 3, "checkpoints kept (older ones are removed)")
  eval_test_at_end: bool = _f("report", True, "evaluate the test split when training ends")
  distributed: Optional[bool] = _f("report", None, "join a multi-host run (None: when the "
                                   "environment or the three fields below describe one; False: "
                                   "never)")
  coordinator_address: Optional[str] = _f("report", None, "multi-host: host:port of process 0 "
                                          "(else JAX_COORDINATOR_ADDRESS, or the cluster's)")
  num_processes: Optional[int] = _f("report", None, "multi-host: number of processes (else "
                                    "JAX_NUM_PROCESSES)")
  process_id: Optional[int] = _f("report", None, "multi-host: this process's index (else "
                                 "JAX_PROCESS_ID)")
  heartbeat_timeout_seconds: int = _f("report", 100, "multi-host: a process that stops answering "
                                      "for this long ends the others")


@dataclasses.dataclass(frozen=True)
class ResMemSettings:
  """The memory, the selection of k / sigma / T on validation, and evaluation (``resmem_jax.jobs``).

  ``k``, ``sigma`` and ``temperature`` left as None are chosen on the validation split from the
  grids by ``select_by``. With ``sigma_relative`` the ``sigma_grid`` values are multiples of the
  median distance from a validation row to its nearest memory key (embedding distances have no
  natural unit); a fixed ``sigma`` is absolute.
  """
  backend: str = _f("memory", "scann", "nearest-neighbour index: exact | scann | approx "
                    "(on-device, TPU)")
  backend_options: str = _f("memory", "", "'key=value,...' options of the backend, e.g. "
                            "'mode=tree_ah,num_leaves=400' (resmem_jax/memory/scann.py)")
  residual_format: str = _f("memory", "dense", "stored residuals: dense (float32) | bfloat16 | "
                            "sparse (the label + top_m largest probabilities) | sparse_float16 "
                            "(sparse, float16 values)")
  top_m: int = _f("memory", 16, "sparse: entries kept besides the label")
  shard_dir: str = _f("report", "", "a folder for a streamed memory build: the inference pass "
                      "writes the training rows there in shards as it goes, the memory is built "
                      "from them (float32 keys never all in RAM), and a rerun after a kill "
                      "resumes after the last complete shard; empty: build in RAM")
  shard_rows: int = _f("report", 262144, "streamed build: rows per shard, at least (whole "
                       "batches)")
  key_format: str = _f("memory", "float32", "stored keys: float32 | bfloat16 | float16 | int8 "
                       "(the residual from the nearest of 1,024 centroids; float16 and int8 with "
                       "a scale per row; resmem_jax/memory/keys.py)")
  k: Optional[int] = _f("memory", None, "neighbours per query (None: chosen from k_grid on "
                        "validation)")
  sigma: Optional[float] = _f("memory", None, "softmax temperature of the neighbour weights, "
                              "absolute (None: chosen from sigma_grid)")
  temperature: Optional[float] = _f("memory", None, "T of the base prediction softmax(z / T) the "
                                    "residuals are taken against (None: chosen from the grid)")
  k_grid: tuple[int, ...] = _f("memory", (1, 2, 4, 8, 16, 32, 64, 128), "candidate k")
  sigma_grid: tuple[float, ...] = _f("memory", SIGMA_GRID, "candidate sigma (relative: see "
                                     "sigma_relative)")
  sigma_relative: bool = _f("memory", True, "sigma_grid values are multiples of the median "
                            "distance to the nearest memory key")
  temperature_grid: tuple[float, ...] = _f("memory", (0.5, 1.0, 2.0, 4.0), "candidate T")
  select_by: str = _f("memory", "accuracy", "validation criterion: accuracy | squared_loss | "
                      "log_loss (ties: lower log loss, then smaller k)")
  base_mix: Optional[float] = _f("memory", None, "ResMem's probabilities are (1 - mix) * "
                                 "normalize(max(p + r, 0)) + mix * p_base (None: mix chosen on "
                                 "validation log loss)")
  base_mix_grid: tuple[float, ...] = _f("memory", (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
                                        "candidate mixes (1: the base model itself)")
  gate_alpha: Optional[float] = _f("memory", None, "opt-in memorization gate, reported beside "
                                   "ResMem (which always memorizes): choose on half of "
                                   "validation, test the gain over the best temperature-scaled "
                                   "base on the other half at this level (None: no gate)")
  knnlm: bool = _f("memory", False, "also report kNN-LM (the neighbours' labels mixed into p)")
  knn_lambda: Optional[float] = _f("memory", None, "kNN-LM mixture weight (None: chosen on "
                                   "validation)")
  knn_lambda_grid: tuple[float, ...] = _f("memory", (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
                                          "candidate kNN-LM weights")
  eval_batch_size: int = _f("report", 1024, "examples (sequences) per inference batch")
  max_validation_rows: Optional[int] = _f("memory", None, "use at most this many validation rows "
                                          "(examples or tokens) to choose")
  evaluate_train: bool = _f("report", True, "also report training-split accuracy (memorization)")
  timing_repeats: int = _f("report", 3, "prediction-cost figure: fastest of this many timed test "
                           "passes")
  tune_recall: Optional[float] = _f("memory", None, "partitioned scann: tune its query settings "
                                    "on validation to this recall@k against exact search")
  memory_across_hosts: bool = _f("memory", False, "several hosts: each process keeps and indexes "
                                 "only the training rows it embedded (for memories one host "
                                 "cannot hold); queries ask every host and merge the k nearest")


@dataclasses.dataclass(frozen=True)
class Settings:
  seed: int = _f("model", 0, "seed of parameter init, dropout and batch order")
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


# Fields that were removed, with what replaces them.
REMOVED_FIELDS = {
    "resmem.memorize_if_p_below": (
        "resmem.memorize_if_p_below was removed: ResMem now always memorizes (the paper's rule); "
        "for the opt-in significance gate, reported beside ResMem, set resmem.gate_alpha=0.05"),
}


def unknown_field_message(path: str) -> str:
  """``unknown config field <path> (did you mean ...?); <section> fields are: ...``."""
  if path in REMOVED_FIELDS:
    return REMOVED_FIELDS[path]
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


def describe(settings: Settings) -> str:
  """Every field as ``section.field = value  # meaning``, one per line."""
  seed_help = next(f for f in dataclasses.fields(Settings) if f.name == "seed").metadata["help"]
  lines = [f"seed = {settings.seed!r}  # {seed_help}"]
  for section, cls in SECTIONS.items():
    values = getattr(settings, section)
    lines.append(f"# {section}: {(cls.__doc__ or cls.__name__).splitlines()[0]}")
    for field in dataclasses.fields(cls):
      value = json_ready(getattr(values, field.name))
      lines.append(f"{section}.{field.name} = {value!r}  # {field.metadata.get('help', '')}")
  return "\n".join(lines)


def to_dict(settings: Settings) -> dict:
  """Plain JSON-ready dict of every field (tuples become lists)."""
  return json_ready(dataclasses.asdict(settings))


def json_ready(value):
  if isinstance(value, dict):
    return {k: json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  return value


def affects(field: dataclasses.Field) -> str:
  """What ``field`` changes (:data:`AFFECTS`); TypeError for a field that does not say."""
  value = field.metadata.get("affects")
  if value not in AFFECTS:
    raise TypeError(f"settings field {field.name!r} does not declare what it affects (one of "
                    f"{AFFECTS}); declare it with _f(affects, default, help)")
  return value


def values_affecting(settings: Settings, kinds: Iterable[str]) -> dict[str, Any]:
  """``{"seed": ..., "data": {"name": ..., ...}, ...}``: the JSON-ready value of every field whose
  declaration is one of ``kinds``, read from the instance (a section subclass's own fields
  count), in declaration order; sections with no such field are left out."""
  kinds = set(kinds)
  unknown = kinds - set(AFFECTS)
  if unknown:
    raise ValueError(f"{sorted(unknown)} are not among {AFFECTS}")
  out = {}
  for field in dataclasses.fields(settings):
    value = getattr(settings, field.name)
    if dataclasses.is_dataclass(value):
      chosen = {f.name: json_ready(getattr(value, f.name)) for f in dataclasses.fields(value)
                if affects(f) in kinds}
      if chosen:
        out[field.name] = chosen
    elif affects(field) in kinds:
      out[field.name] = json_ready(value)
  return out


def fields_affecting(settings: Settings, kinds: Iterable[str]) -> dict[str, Any]:
  """:func:`values_affecting` flat: ``{"seed": ..., "data.name": ..., ...}``."""
  flat = {}
  for name, value in values_affecting(settings, kinds).items():
    if isinstance(value, dict):
      flat.update({f"{name}.{field}": v for field, v in value.items()})
    else:
      flat[name] = value
  return flat


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


def _finite(path: str, value, low: float = 0.0) -> None:
  _require(math.isfinite(value) and value >= low,
           f"{path} must be a finite number >= {low:g}, got {value!r}")


def _seed(path: str, value: int) -> None:
  _require(0 <= value <= MAX_SEED, f"{path} must be an integer in [0, 2**31 - 1] (a 32-bit seed "
           f"for NumPy, JAX and TensorFlow, with room for the + 1 or + i added to it), got {value}")


def validate_values(settings: Settings) -> None:
  """Ranges and fixed choices of every field (no registry lookups; see :func:`check`)."""
  d, m, t, r = settings.data, settings.model, settings.train, settings.resmem
  _seed("seed", settings.seed)
  _seed("data.split_seed", d.split_seed)
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
  _choice("model.conv_impl", m.conv_impl, CONV_IMPLS)
  _choice("model.cpu_compiler_options", m.cpu_compiler_options, CPU_COMPILER_OPTIONS)
  _require(0.0 <= m.dropout_rate < 1.0, f"model.dropout_rate must be in [0, 1), got {m.dropout_rate}")

  _finite("train.num_epochs", t.num_epochs)
  _require(t.num_steps > 0 or t.num_epochs > 0,
           f"train.num_epochs (or train.num_steps) must be positive, got {t.num_epochs} / {t.num_steps}")
  _positive("train.batch_size", t.batch_size, integer=True)
  _positive("train.eval_batch_size", t.eval_batch_size, integer=True)
  _choice("train.optimizer", t.optimizer, OPTIMIZERS)
  _choice("train.schedule", t.schedule, SCHEDULES)
  _choice("train.dtype", t.dtype, DTYPES)
  _positive("train.learning_rate", t.learning_rate)
  _require(0.0 <= t.momentum < 1.0, f"train.momentum must be in [0, 1), got {t.momentum}")
  _require(0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0,
           f"train.b1 and train.b2 must be in [0, 1), got {t.b1} and {t.b2}")
  _finite("train.weight_decay", t.weight_decay)
  _finite("train.warmup_epochs", t.warmup_epochs)
  _positive("train.step_factor", t.step_factor)
  _require(all(0 < b < 1 for b in t.step_boundaries),
           f"train.step_boundaries must lie in (0, 1), got {t.step_boundaries}")
  _require(0 <= t.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
  _finite("train.grad_clip_norm", t.grad_clip_norm)
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
  _require(r.gate_alpha is None or 0 < r.gate_alpha < 1,
           f"resmem.gate_alpha must be in (0, 1) or None, got {r.gate_alpha}")
  _require(r.base_mix is None or 0 <= r.base_mix <= 1,
           f"resmem.base_mix must be in [0, 1] or None, got {r.base_mix}")
  _require(r.knn_lambda is None or 0 < r.knn_lambda <= 1,
           f"resmem.knn_lambda must be in (0, 1] or None, got {r.knn_lambda}")
  _positive("resmem.eval_batch_size", r.eval_batch_size, integer=True)
  _positive("resmem.max_validation_rows", r.max_validation_rows, allow_none=True, integer=True)
  _positive("resmem.timing_repeats", r.timing_repeats, integer=True)
  _require(r.tune_recall is None or 0 < r.tune_recall <= 1,
           f"resmem.tune_recall must be in (0, 1] or None, got {r.tune_recall}")


def validation_needed_message(r: ResMemSettings) -> str:
  """Why the settings need a validation split, and how to do without one."""
  if r.gate_alpha is not None:
    return ("resmem.gate_alpha tests the memory on validation rows: give a validation split "
            "(data.val_fraction > 0) or unset resmem.gate_alpha")
  return ("choosing k, sigma and temperature needs a validation split: set data.val_fraction > 0,"
          " or fix resmem.k, resmem.sigma, resmem.temperature, resmem.base_mix (and "
          "resmem.knn_lambda when resmem.knnlm is on)")


def needs_validation(r: ResMemSettings) -> bool:
  """Whether anything is left to choose on the validation split."""
  resmem_fixed = (r.k is not None and r.sigma is not None and r.temperature is not None
                  and r.base_mix is not None)
  knn_fixed = not r.knnlm or r.knn_lambda is not None
  return (not (resmem_fixed and knn_fixed) or r.tune_recall is not None
          or r.gate_alpha is not None)


# ----------------------------------------------------------------------------- against the data


def check_neighbours(r: ResMemSettings, rows: int, prefix: str = "resmem.") -> None:
  """SettingsError unless the fixed ``k``, or some ``k`` of the grid, fits a memory of ``rows``
  rows (larger grid values are skipped when choosing)."""
  if r.k is not None and r.k > rows:
    raise SettingsError(f"{prefix}k={r.k} is larger than the memory: the training split gives "
                        f"{rows:,} rows; set {prefix}k <= {rows}")
  if r.k is None and min(r.k_grid) > rows:
    raise SettingsError(f"{prefix}k_grid={r.k_grid} has no k <= the {rows:,} rows of the "
                        f"training split; add smaller values (e.g. 1)")


def host_memory_bytes() -> int:
  """The host's physical memory in bytes (os.sysconf)."""
  import os  # pylint: disable=g-import-not-at-top
  return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))


def check_batch_fits(path: str, batch: int, example_shape, itemsize: int = 4) -> None:
  """SettingsError when one batch of inputs alone outgrows the host's memory (the host pads and
  holds every batch whole); ``path`` names the batch-size field or argument."""
  shape = tuple(int(n) for n in example_shape)
  need = int(batch) * math.prod(shape) * int(itemsize)
  available = host_memory_bytes()
  if need > available:
    raise SettingsError(
        f"{path}={batch:,} cannot fit: {batch:,} examples x {shape} x {itemsize} bytes = "
        f"{need / 1e9:.3g} GB of inputs per batch, more than this host's {available / 1e9:.3g} "
        f"GB; lower {path}")
