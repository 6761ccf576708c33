"""The search-index interface every memory backend implements, and the backend registry.

A backend finds candidate neighbours; the :class:`~resmem_jax.memory.Memory` then re-ranks every
backend's candidates once by directly computed Euclidean distance
(:func:`resmem_jax.memory.exact.rerank_exact`), so distances are exact whatever the backend and a
backend only has to return good candidate ids. Adding a backend is one module in this package
with a :class:`SearchIndex` subclass plus one line in :data:`BACKENDS`; building, searching,
editing, saving, loading, config checks and query tuning all go through this interface.

Backend modules are imported by name (``"module:Class"``) when first used, and a backend imports
its own library only to build or load an index, so checking a config that names ``scann`` does
not import ScaNN (or TensorFlow).
"""
from __future__ import annotations

import abc
import importlib
from typing import ClassVar

import numpy as np

from resmem_jax.memory.keys import KeyStore
from resmem_jax.suggest import did_you_mean

# backend name -> "module:class" of its SearchIndex
BACKENDS = {
    "exact": "resmem_jax.memory.exact:ExactIndex",
    "scann": "resmem_jax.memory.scann:ScannIndex",
    "approx": "resmem_jax.memory.approx:ApproxIndex",
}


def check_choice(field: str, value, choices) -> None:
  """ValueError naming ``field`` and the valid ``choices`` unless ``value`` is one of them."""
  if value not in choices:
    raise ValueError(f"{field} must be one of {list(choices)}, got {value!r}"
                     f"{did_you_mean(value, choices)}")


def index_class(backend: str, field: str = "backend") -> type[SearchIndex]:
  """The :class:`SearchIndex` subclass registered as ``backend`` (imports its module)."""
  check_choice(field, backend, tuple(BACKENDS))
  module, name = BACKENDS[backend].split(":")
  return getattr(importlib.import_module(module), name)


def check_option_names(what: str, options: dict, names) -> None:
  """ValueError listing unknown names of ``what`` (e.g. "scann backend options"), with a
  suggestion, and the valid ones."""
  unknown = sorted(set(options) - set(names))
  if unknown:
    raise ValueError(f"unknown {what} {unknown}{did_you_mean(unknown[0], names)}; valid: "
                     f"{list(names)}")


def integer_option(backend: str, name: str, value, minimum: int) -> int:
  """``value`` as an int >= ``minimum`` (integer-valued floats accepted), or ValueError."""
  numeric = isinstance(value, (int, float, np.integer, np.floating)) and \
      not isinstance(value, (bool, np.bool_))
  if not numeric or not np.isfinite(value) or value != int(value) or int(value) < minimum:
    raise ValueError(f"{backend} option {name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def devices_option(backend: str, devices):
  """``devices`` (a non-empty list of JAX devices, or None for the backend's default), or
  ValueError."""
  if devices is not None and (isinstance(devices, str) or not hasattr(devices, "__len__")
                              or len(devices) == 0):
    raise ValueError(f"{backend} option devices must be a non-empty list of devices, got {devices!r}")
  return devices


def bounded_put(cache: dict, key, make, limit: int):
  """``cache[key]``, made by ``make()`` when missing; beyond ``limit`` entries the oldest goes
  (an index family's compiled searches: each layout compiles its own)."""
  if key not in cache:
    if len(cache) >= limit:
      del cache[next(iter(cache))]
    cache[key] = make()
  return cache[key]


class SearchIndex(abc.ABC):
  """Candidate nearest neighbours over a memory's keys (row i is key id i).

  ``build``, ``extend`` and ``load`` get the memory's :class:`~resmem_jax.memory.keys.KeyStore`:
  ``keys.float32()`` is every key as float32 ``[n, d]`` (a decoded copy for a compact key format;
  an index that keeps float32 keys keeps that copy), ``keys.rows(start, stop)`` a slice of them.
  An index that needs no float keys after its build (scann) reads them in slices, so a compact
  memory never holds them all as float32 at once.

  Instances are shared between memories (``Memory.with_residuals``) and never change their keys:
  :meth:`extend` returns a new index. Only the query-time settings are set in place.
  """

  OPTION_NAMES: ClassVar[tuple[str, ...]] = ()
  # (importable module, pip extra) of an optional package the backend needs, or None.
  REQUIRES: ClassVar[tuple[str, str] | None] = None

  size: int  # keys indexed
  options: dict  # build options that define the index, JSON-ready (saved in the manifest)

  @classmethod
  @abc.abstractmethod
  def check_options(cls, options: dict) -> dict:
    """Checked (and typed) options; ValueError on an unknown name or bad value. Must not import
    the backend's library: config checks call it before anything slow."""

  @classmethod
  def has_query_settings(cls, num_keys: int, options: dict) -> bool:
    """Whether an index of ``num_keys`` keys built with ``options`` has query settings to tune."""
    del num_keys, options
    return False

  @classmethod
  @abc.abstractmethod
  def build(cls, keys: KeyStore, options: dict) -> SearchIndex:
    """An index over ``keys`` (n >= 1, already checked by the memory)."""

  @abc.abstractmethod
  def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids int32 ``[q, >= min(k, size)]`` of (approximately) the k nearest keys, -1 for none.
    Unranked: the memory re-ranks them by exact distance. A row with fewer than min(k, size)
    distinct ids in ``[0, size)`` (an index that could not answer it) is searched exhaustively by
    the memory instead, so an index should answer all rows it can."""

  @abc.abstractmethod
  def extend(self, keys: KeyStore) -> SearchIndex:
    """A new index over ``keys``: all keys, those of this index first (memory editing)."""

  @abc.abstractmethod
  def save(self, directory: str) -> dict:
    """Writes the index's files into the existing ``directory``; returns the JSON-ready info
    :meth:`load` needs (stored in the memory's manifest)."""

  @classmethod
  @abc.abstractmethod
  def load(cls, directory: str, keys: KeyStore, info: dict) -> SearchIndex:
    """The index :meth:`save` wrote, over the memory's ``keys``; ValueError if they or ``info``
    disagree (``info`` comes from a checksummed manifest, but check its fields anyway)."""

  # Query-time settings (indexes without any keep these defaults).
  def query_settings_grid(self, **grids) -> list[list[dict]]:
    """Settings to try when tuning, as sweeps: within a sweep each setting costs more and finds
    at least as much as the one before, so a tuner stops a sweep at the first that is good
    enough. ``grids`` override the index's default values per knob."""
    del grids
    raise ValueError(self._no_settings())

  def query_settings(self) -> dict:
    """The current query-time settings."""
    raise ValueError(self._no_settings())

  def set_query_settings(self, **settings) -> None:
    """Sets query-time settings; they are saved with the index and kept by :meth:`extend`."""
    del settings
    raise ValueError(self._no_settings())

  def _no_settings(self) -> str:
    return (f"{type(self).__name__} has no query-time settings to tune; tuning needs the scann "
            "backend in tree_ah or ah mode")
