"""Typed settings: defaults in one place, every field checked before anything slow starts."""
import dataclasses
import importlib
import time

import pytest

from resmem_jax import settings

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
  settings.check(s)  # registry names: data set, model, memory backend and its options


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
    settings.check(settings.from_config(cfg))
  assert time.perf_counter() - start < 30  # a loose bound: the point is "no training first"


def test_choosing_needs_a_validation_split():
  cfg = _config()
  cfg.data.val_fraction = 0.0
  with pytest.raises(settings.SettingsError, match="validation split"):
    settings.check(settings.from_config(cfg))
  cfg.resmem.k, cfg.resmem.sigma, cfg.resmem.temperature = 1, 1.0, 1.0
  with pytest.raises(settings.SettingsError, match="base_mix"):  # the mix is still to choose
    settings.check(settings.from_config(cfg))
  cfg.resmem.base_mix = 0.5
  settings.check(settings.from_config(cfg))  # all fixed: nothing to choose
  cfg.resmem.gate_alpha = 0.05  # the gate tests on validation rows
  with pytest.raises(settings.SettingsError, match="gate_alpha tests the memory on validation"):
    settings.check(settings.from_config(cfg))
  cfg.resmem.gate_alpha = None
  cfg.resmem.tune_recall = 0.9
  cfg.resmem.backend = "exact"
  with pytest.raises(settings.SettingsError, match="tune_recall"):
    settings.check(settings.from_config(cfg))


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
