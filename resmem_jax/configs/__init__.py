"""The packaged configs: ml_collections config files a binary takes by name.

``--config=NAME[:VARIANT]`` (e.g. ``--config=digits``, ``--config=mnist:serving``) loads
``resmem_jax/configs/NAME.py`` from the installed package; ``--config=path/to/file.py[:VARIANT]``
loads any other config file (start one from ``resmem_jax.configs.common.base_config()``). Each
config's ``get_config(variant)`` documents its variants; every one has ``tiny`` for CPU smoke tests.
"""
from __future__ import annotations

import pathlib

from resmem_jax import suggest

FOLDER = pathlib.Path(__file__).resolve().parent
# Packaged configs, by name (common.py holds the shared defaults and is no config by itself).
NAMES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet", "tiny_shakespeare",
         "lm1b", "c4")


def path(name: str) -> pathlib.Path:
  """The file of packaged config ``name``; ValueError (with a suggestion) for an unknown name."""
  if name not in NAMES:
    raise ValueError(f"--config={name!r} is neither a packaged config"
                     f"{suggest.did_you_mean(name, NAMES)} nor a .py file; "
                     f"packaged: {', '.join(NAMES)}")
  return FOLDER / f"{name}.py"
