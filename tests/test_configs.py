"""Every shipped config variant loads, names real fields, and rejects unknown variants."""
import importlib

import pytest

from resmem_jax import pipeline
from resmem_jax.memory import scann_index

VARIANTS = {
    "digits": ["", "tiny"],
    "mnist": ["", "serving", "mlp", "tiny"],
    "fashion_mnist": ["", "serving", "mlp", "tiny"],
    "cifar10": ["", "tiny"],
    "cifar100": ["", "tiny"],
    "imagenet": ["", "tiny"],
    "tiny_shakespeare": ["", "tiny"],
    "lm1b": ["", "tiny"],
    "c4": ["", "tiny"],
}


@pytest.mark.parametrize("module_name,variant",
                         [(m, v) for m, variants in VARIANTS.items() for v in variants])
def test_variant_loads_with_valid_memory_options(module_name, variant):
  cfg = importlib.import_module(f"experiments.configs.{module_name}").get_config(variant or None)
  assert cfg.data.name and cfg.model.name
  assert int(cfg.resmem.timing_repeats) >= 1
  options = pipeline.parse_backend_options(cfg.resmem.backend_options)
  unknown = set(options) - set(scann_index.OPTION_NAMES)
  assert not unknown, f"{module_name}:{variant} sets unknown ScaNN options {unknown}"


def test_serving_variant_is_the_narrow_embedding_tree_ah_setup():
  cfg = importlib.import_module("experiments.configs.mnist").get_config("serving")
  assert cfg.model.name == "cnn" and cfg.model.embed_dim == 32
  assert pipeline.parse_backend_options(cfg.resmem.backend_options)["mode"] == "tree_ah"


@pytest.mark.parametrize("module_name", sorted(VARIANTS))
def test_unknown_variant_is_rejected(module_name):
  with pytest.raises(ValueError, match="variant"):
    importlib.import_module(f"experiments.configs.{module_name}").get_config("no_such_variant")
