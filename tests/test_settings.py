"""Typed settings: defaults in one place, every field checked before anything slow starts."""
import dataclasses
import importlib
import time

import numpy as np
import pytest

from resmem_jax import settings
from resmem_jax import suggest
from resmem_jax import validate

VARIANTS = {
    "digits": ["", "tiny"],
    "mnist": ["", "serving", "resnet", "mlp", "small_mlp", "tiny"],
    "fashion_mnist": ["", "serving", "resnet", "mlp", "small_mlp", "tiny"],
    "cifar10": ["", "tiny"],
    "cifar100": ["", "tiny"],
    "imagenet": ["", "tiny"],
    "tiny_shakespeare": ["", "tiny"],
    "lm1b": ["", "tiny"],
    "c4": ["", "tiny"],
}


def _config(module="digits", variant="tiny"):
  return importlib.import_module(f"resmem_jax.configs.{module}").get_config(variant or None)


def test_default_config_round_trips_to_the_dataclass_defaults():
  assert settings.from_config(settings.default_config()) == settings.Settings()
  as_dict = settings.to_dict(settings.Settings())
  assert as_dict["resmem"]["k_grid"] == list(settings.ResMemSettings().k_grid)


@pytest.mark.parametrize("module_name,variant",
                         [(m, v) for m, variants in VARIANTS.items() for v in variants])
def test_every_shipped_config_is_valid(module_name, variant):
  s = settings.from_config(_config(module_name, variant))
  validate.check(s)  # registry names: data set, model, memory backend and its options


@pytest.mark.parametrize("module_name", sorted(VARIANTS))
def test_each_config_declares_the_variants_it_builds(module_name):
  # --help lists a config's VARIANTS; the list here is written out independently.
  module = importlib.import_module(f"resmem_jax.configs.{module_name}")
  assert list(module.VARIANTS) == VARIANTS[module_name]


@pytest.mark.parametrize("module_name", sorted(VARIANTS))
def test_unknown_variant_is_rejected(module_name):
  with pytest.raises(ValueError, match="variant"):
    _config(module_name, "no_such_variant")


@pytest.mark.parametrize("field,value,message", [
    ("resmem.select_by", "acc", r"resmem.select_by='acc' is not one of .*did you mean 'accuracy'"),
    ("resmem.k_grid", (), "resmem.k_grid is empty"),
    ("resmem.sigma", -1.0, "resmem.sigma must be a positive"),
    ("resmem.knn_lambda_grid", (0.5, 2.0), "resmem.knn_lambda_grid values"),
    ("resmem.tune_recall", 1.5, "resmem.tune_recall"),
    ("resmem.gate_alpha", 1.0, r"resmem.gate_alpha must be in \(0, 1\)"),
    ("train.optimizer", "lamb", "train.optimizer='lamb'"),
    ("train.schedule", "linear", "train.schedule"),
    ("train.dtype", "int8", "train.dtype"),
    ("data.val_fraction", 1.5, "data.val_fraction"),
    ("model.conv_impl", "fft", "model.conv_impl"),
])
def test_bad_values_name_the_field(field, value, message):
  cfg = _config()
  section, name = field.split(".")
  cfg[section][name] = value
  with pytest.raises(settings.SettingsError, match=message):
    settings.from_config(cfg)


def test_unknown_fields_get_a_suggestion():
  values = _config().to_dict()
  values["train"]["num_epoch"] = 3
  with pytest.raises(settings.SettingsError, match=r"train.num_epoch \(did you mean 'num_epochs'\?\)"):
    settings.from_config(values)
  values = _config().to_dict()
  values["resmen"] = {}
  with pytest.raises(settings.SettingsError, match="did you mean 'resmem'"):
    settings.from_config(values)
  with pytest.raises(settings.SettingsError, match="must be an integer"):
    settings.replace_field(settings.Settings(), "model.depth", 2.5)


def test_the_removed_gate_field_says_what_replaces_it():
  values = _config().to_dict()
  values["resmem"]["memorize_if_p_below"] = 1.0
  with pytest.raises(settings.SettingsError, match=r"ResMem now always memorizes.*gate_alpha"):
    settings.from_config(values)


@pytest.mark.parametrize("field,value,message", [
    ("resmem.backend", "faiss", "resmem.backend"),
    ("resmem.residual_format", "sprse", "resmem.residual_format"),
    ("resmem.backend_options", "mode=tre_ah", "resmem.backend_options"),
    ("resmem.backend_options", "num_leafs=4", "resmem.backend_options"),
    ("data.name", "svhn", "data.name"),
    ("model.name", "vgg", "model.name"),
])
def test_registry_checks_fail_within_seconds(field, value, message):
  cfg = _config()
  section, name = field.split(".")
  cfg[section][name] = value
  start = time.perf_counter()
  with pytest.raises(settings.SettingsError, match=message):
    validate.check(settings.from_config(cfg))
  assert time.perf_counter() - start < 30  # a loose bound: the point is "no training first"


def test_choosing_needs_a_validation_split():
  cfg = _config()
  cfg.data.val_fraction = 0.0
  with pytest.raises(settings.SettingsError, match="validation split"):
    validate.check(settings.from_config(cfg))
  cfg.resmem.k, cfg.resmem.sigma, cfg.resmem.temperature = 1, 1.0, 1.0
  with pytest.raises(settings.SettingsError, match="base_mix"):  # the mix is still to choose
    validate.check(settings.from_config(cfg))
  cfg.resmem.base_mix = 0.5
  validate.check(settings.from_config(cfg))  # all fixed: nothing to choose
  cfg.resmem.gate_alpha = 0.05  # the gate tests on validation rows
  with pytest.raises(settings.SettingsError, match="gate_alpha tests the memory on validation"):
    validate.check(settings.from_config(cfg))
  cfg.resmem.gate_alpha = None
  cfg.resmem.tune_recall = 0.9
  cfg.resmem.backend = "exact"
  with pytest.raises(settings.SettingsError, match="tune_recall"):
    validate.check(settings.from_config(cfg))


def test_replace_field_is_checked_and_frozen():
  s = settings.Settings()
  wider = settings.replace_field(s, "model.width", 64)
  assert wider.model.width == 64.0 and s.model.width == 256.0
  assert settings.replace_field(s, "seed", 3).seed == 3
  with pytest.raises(settings.SettingsError, match="data.train_fraction"):
    settings.replace_field(s, "data.train_fraction", 0.0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.seed = 1  # type: ignore[misc]


def test_serving_variant_is_the_narrow_embedding_tree_ah_setup():
  from resmem_jax import memory
  s = settings.from_config(_config("mnist", "serving"))
  assert s.model.name == "cnn" and s.model.embed_dim == 32
  assert memory.parse_backend_options(s.resmem.backend_options)["mode"] == "tree_ah"
  assert s.resmem.tune_recall == 0.97


@pytest.mark.parametrize("field,value,message", [
    ("seed", -1, r"seed must be an integer in \[0, 2\*\*31 - 1\]"),
    ("seed", 2**70, r"seed must be an integer in \[0, 2\*\*31 - 1\].*got 1180591620717411303424"),
    ("data.split_seed", -1, r"data.split_seed must be an integer in \[0, 2\*\*31 - 1\]"),
    ("data.split_seed", 2**40, r"data.split_seed must be an integer in \[0, 2\*\*31 - 1\]"),
    ("train.num_epochs", float("inf"), "train.num_epochs must be a finite number >= 0, got inf"),
    ("train.weight_decay", float("inf"), "train.weight_decay must be a finite number >= 0"),
    ("train.warmup_epochs", float("inf"), "train.warmup_epochs must be a finite number"),
    ("train.grad_clip_norm", float("nan"), "train.grad_clip_norm must be a finite number"),
    ("train.step_factor", 0.0, "train.step_factor must be a positive finite number"),
    ("train.learning_rate", float("inf"), "train.learning_rate must be a positive finite number"),
])
def test_values_that_used_to_fail_later_are_refused_at_once(field, value, message):
  with pytest.raises(settings.SettingsError, match=message):
    settings.replace_field(settings.Settings(), field, value)


@dataclasses.dataclass
class _Info:
  """A data set's shape and sizes, as ``DatasetInfo``."""
  name: str = "digits"
  num_classes: int = 10
  input_shape: tuple = (8, 8, 1)
  input_dtype: str = "float32"
  split_sizes: dict = dataclasses.field(
      default_factory=lambda: {"train": 1293, "validation": 144, "test": 360})


def _with(**fields):
  s = settings.Settings()
  for path, value in fields.items():
    s = settings.replace_field(s, path.replace("__", "."), value)
  return s


@pytest.mark.parametrize("fields,message", [
    ({"resmem__k": 5000}, r"resmem.k=5000 is larger than the memory: the training split gives "
                          r"1,293 rows; set resmem.k <= 1293"),
    ({"resmem__k_grid": (5000,)}, r"resmem.k_grid=\(5000,\) has no k <= the 1,293 rows"),
    ({"model__width": 1e9}, r"model.width=1e\+09, model.depth=2: the mlp has 1e\+18 parameters, "
                            r"x 4 bytes x 3 \(parameters, gradients, 1 optimizer slot\) = "
                            r"1.2e\+10 GB, more than the .* GB of"),
    ({"model__width": 1e9, "train__optimizer": "adam"}, r"x 4 bytes x 4 \(parameters, gradients, "
                                                        r"2 optimizer slots\)"),
    ({"train__eval_batch_size": 10**9}, r"train.eval_batch_size=1,000,000,000 cannot fit: "
                                        r"1,000,000,000 examples x \(8, 8, 1\) x 4 bytes = 256 GB"),
    ({"resmem__eval_batch_size": 10**9}, r"resmem.eval_batch_size=1,000,000,000 cannot fit"),
    ({"train__batch_size": 10**9}, r"train.batch_size=1,000,000,000 cannot fit"),
])
def test_settings_checked_against_the_data_before_training(fields, message):
  with pytest.raises(settings.SettingsError, match=message):
    validate.check_against_data(_with(**fields), _Info())


def test_an_empty_training_split_and_a_tiny_tree_are_refused_before_training():
  info = _Info(split_sizes={"train": 0, "validation": 1437, "test": 360})
  with pytest.raises(settings.SettingsError, match=r"the training split is empty: "
                     r"data.val_fraction=0.9999 leaves 1,437 of the 1,437 training examples"):
    validate.check_against_data(_with(data__val_fraction=0.9999), info)
  small = _Info(split_sizes={"train": 10, "validation": 5, "test": 5})
  with pytest.raises(settings.SettingsError, match=r"scann mode tree_ah needs at least 16 keys"):
    validate.check_against_data(_with(resmem__backend_options="mode=tree_ah", resmem__k_grid=(1,)),
                                 small)
  # Text: a row per token, so k is compared with sequences x tokens.
  text = _Info(num_classes=300, input_shape=(16,), input_dtype="int32",
               split_sizes={"train": 10, "validation": 2, "test": 2})
  validate.check_against_data(_with(resmem__k=160), text)
  with pytest.raises(settings.SettingsError, match="resmem.k=161 .* 160 rows"):
    validate.check_against_data(_with(resmem__k=161), text)
  large = _Info(split_sizes={"train": 10000, "validation": 5, "test": 5})
  with pytest.raises(settings.SettingsError, match=r"training_sample_size=1 is too small"):
    validate.check_against_data(_with(resmem__backend_options="mode=ah,training_sample_size=1"),
                                 large)
  with pytest.raises(settings.SettingsError, match=r"resmem.backend_options=.*"
                     r"training_sample_size=64 is below the tree's 100 leaves"):
    validate.check_against_data(_with(
        resmem__backend_options="mode=tree_ah,num_leaves=100,training_sample_size=64"), large)
  validate.check_against_data(settings.Settings(), _Info())  # the defaults fit


def test_the_parameter_count_is_the_models():
  import jax
  from resmem_jax import models
  model = settings.ModelSettings(width=32)
  variables = models.build_model(model, 10).init(jax.random.key(0), np.zeros((1, 8, 8, 1)))
  assert validate.parameter_count(model, _Info()) == models.count_params(variables)


@pytest.mark.parametrize("options,message", [
    ("num_threads=50000", r"num_threads must be at most 1024"),
    ("reorder=2147483648", r"reorder must be at most 2\*\*31 - 1"),
])
def test_scann_option_ranges_are_checked_with_the_settings(options, message):
  with pytest.raises(settings.SettingsError, match=message):
    validate.check(_with(resmem__backend_options=options))


def test_every_field_declares_what_it_affects():
  top = [f for f in dataclasses.fields(settings.Settings) if f.name not in settings.SECTIONS]
  every = top + [f for cls in settings.SECTIONS.values() for f in dataclasses.fields(cls)]
  assert len(every) > 70  # it saw every section
  undeclared = [f.name for f in every if f.metadata.get("affects") not in settings.AFFECTS]
  assert not undeclared, f"fields without affects=model|memory|report: {undeclared}"
  # The README's promise: resmem.* fields change freely (the memory is rebuilt, the model kept).
  assert all(settings.affects(f) != "model" for f in dataclasses.fields(settings.ResMemSettings))
  # A field added without the declaration is refused where it is first read, naming it.
  bare = dataclasses.make_dataclass("Bare", [("new_knob", int, 1)],
                                    bases=(settings.ResMemSettings,), frozen=True)
  with pytest.raises(TypeError, match="'new_knob' does not declare what it affects"):
    settings.fields_affecting(dataclasses.replace(settings.Settings(), resmem=bare()), ["memory"])


def test_fields_by_what_they_affect():
  s = settings.Settings()
  model = settings.fields_affecting(s, ["model"])
  assert model["seed"] == 0 and model["train.learning_rate"] == 0.1 and "data.name" in model
  assert "train.log_every_steps" not in model and "resmem.k_grid" not in model
  nested = settings.values_affecting(s, ["model", "memory"])
  assert list(nested) == ["seed", "data", "model", "train", "resmem"]
  assert nested["resmem"]["k_grid"] == list(s.resmem.k_grid)  # JSON-ready
  assert "eval_batch_size" not in nested["resmem"] and "data_dir" not in nested["data"]
  with pytest.raises(ValueError, match="memroy"):
    settings.fields_affecting(s, ["memroy"])


def test_one_suggestion_helper_everywhere():
  assert suggest.did_you_mean("acuracy", settings.SELECT_BY) == " (did you mean 'accuracy'?)"
  assert suggest.did_you_mean("zzz", settings.SELECT_BY) == ""
  from resmem_jax import configs, models
  with pytest.raises(ValueError, match=r"'digit' is neither a packaged config \(did you mean "
                     r"'digits'\?\)"):
    configs.path("digit")
  with pytest.raises(ValueError, match=r"model.name='mpl' is not a model \(did you mean 'mlp'\?\)"):
    models.check_settings(settings.ModelSettings(name="mpl"))


def test_each_set_of_choices_is_defined_once():
  from resmem_jax import models
  from resmem_jax.core import selection
  from resmem_jax.models import resnet
  assert selection.CRITERIA is settings.SELECT_BY
  assert resnet.CONV_IMPLS is settings.CONV_IMPLS
  assert {str(np.dtype(models.compute_dtype(name))) for name in settings.DTYPES} == set(
      settings.DTYPES)
