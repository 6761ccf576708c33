"""Shared start of every config: all fields at their defaults (defined once, in resmem_jax/settings.py).

Every data-set config starts from ``base_config()`` and overrides what differs. Any field can be
set from the command line, e.g. ``--config.train.num_epochs=3 --config.data.data_dir=/tmp/tfds``;
the binaries read the result into typed, checked settings before anything slow starts.
"""
from __future__ import annotations

from resmem_jax import settings


def base_config():
  """Every field of :class:`resmem_jax.settings.Settings` at its default, as a ConfigDict."""
  return settings.default_config()


def unknown_variant(name: str, variant: str, variants: tuple[str, ...]) -> ValueError:
  """The error for a variant a config does not have, listing its ``VARIANTS``."""
  listed = ", ".join(repr(v) for v in variants)
  return ValueError(f"unknown {name} config variant {variant!r} (use one of {listed})")
