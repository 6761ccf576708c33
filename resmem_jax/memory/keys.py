"""How a memory stores its keys: ``float32``, ``bfloat16``, ``float16`` or ``int8``.

``float32``   the keys as given; 4 d bytes per row. Exact.
``bfloat16``  each key as the nearest of ``CODEBOOK_SIZE`` (1,024) centroids (k-means on a sample
              of the keys, fixed at the build) plus its residual from that centroid in bfloat16:
              entry error <= ``2**-9 |key - centroid|``. 2 d + 2 bytes per row.
``float16``   the same centroids, the residual divided by its largest entry (a float32 scale per
              row) in float16: ``key ~ centroid[j] + scale * code``, entry error <= ``2**-12
              max|key - centroid|`` (the scale keeps every code within float16's range). 2 d + 6
              bytes per row; 8x finer than bfloat16's bound for 4 more bytes.
``int8``      the same centroids, the residual in int8 with one float32 scale per row:
              ``key ~ centroid[j] + scale * code``, entry error <= ``scale / 2 =
              max|key - centroid| / 254``. d + 6 bytes per row.
Coding the residual from a nearby centroid, not the key itself, is what keeps neighbours, and the
more centroids the closer (BUILD_NOTES.md, issue 21): on clustered 100k x 128 points bfloat16 keys
kept the exact top-10 of 88% of queries, bfloat16 residuals 96.5%; int8 codes around the keys'
mean gave recall@10 0.954, around the nearest of 256 centroids 0.99; on 300k points in 1,000
clusters, 256 centroids gave int8 recall@10 0.972, 1,024 gave 0.985. On 1M dense clustered points
(1,000 clusters, d = 128) the exact top-10 set was kept for 84% of queries by int8, 93% by bfloat16
and 99% by float16.

The memory searches and re-ranks with the keys as stored (dequantized rows), so with a compact
format its distances are those of the stored keys, and neighbours are exact for those keys; the
error against the float32 keys is the format's rounding above. Keys added after the build are
coded with the same centroids.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from resmem_jax.memory import scaling

KEY_FORMATS = ("float32", "bfloat16", "float16", "int8")
CODEBOOK_SIZE = 1024  # centroids of the compact formats: one uint16 id per row
CODEBOOK_SAMPLE = 65_536  # keys the centroids are learned from (a random sample)
CODEBOOK_ITERATIONS = 10  # Lloyd iterations (the assignment cost is what matters, not the fit)
ROWS_PER_CHUNK = 65_536  # rows coded or dequantized per step: bounds the float32 temporaries
# What keys.npy holds in each format (numpy cannot write bfloat16: its bit pattern as uint16).
_CODE_DTYPES = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16,
                "int8": np.int8}


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
  """bfloat16 bit patterns (uint16) as float32: the top half of a float32's bits."""
  return (bits.astype(np.uint32) << 16).view(np.float32)


class _Codebook:
  """Centroids ready for nearest-centroid search in float32: scaled by a power of two so that no
  product can overflow (keys reach 2**100), with their half squared norms."""

  def __init__(self, centroids: np.ndarray):
    self.exponent = scaling.key_exponent(centroids)
    self.scaled = scaling.scaled(centroids, self.exponent)
    self.half_norms = 0.5 * np.einsum("cd,cd->c", self.scaled, self.scaled)

  def nearest(self, rows: np.ndarray) -> np.ndarray:
    """The nearest centroid's id of each row. Rounding can pick the second-nearest of two almost
    equally near centroids, which only makes that row's residual slightly larger."""
    scaled = scaling.scaled(np.clip(rows, -scaling.MAX_MAGNITUDE, scaling.MAX_MAGNITUDE),
                            self.exponent)
    return np.argmin(self.half_norms[None, :] - scaled @ self.scaled.T, axis=1).astype(np.uint16)


def learn_codebook(sample: np.ndarray, seed: int = 0) -> np.ndarray:
  """``CODEBOOK_SIZE`` centroids ``[c, d]`` float32 of ``sample`` (k-means, Lloyd's iterations;
  fewer centroids when the sample has fewer distinct rows)."""
  rng = np.random.default_rng(seed)
  sample = np.asarray(sample, np.float32)
  if sample.shape[0] > CODEBOOK_SAMPLE:
    sample = sample[np.sort(rng.choice(sample.shape[0], CODEBOOK_SAMPLE, replace=False))]
  distinct = np.unique(sample, axis=0)
  count = min(CODEBOOK_SIZE, distinct.shape[0])
  centroids = distinct[rng.choice(distinct.shape[0], count, replace=False)]
  for _ in range(CODEBOOK_ITERATIONS):
    assigned = _Codebook(centroids).nearest(sample)
    sums = np.zeros(centroids.shape, np.float64)
    np.add.at(sums, assigned, sample)
    counts = np.bincount(assigned, minlength=count)
    filled = counts > 0  # an empty centroid keeps its place
    centroids = centroids.copy()
    centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
  return centroids


class KeyStore:
  """A memory's keys ``[n, d]`` in one of :data:`KEY_FORMATS`.

  ``arrays()`` are what is saved (``keys`` and, but for float32, ``key_centroid_ids`` and
  ``key_centroids``; for float16 and int8 also ``key_scales``); ``take(ids)`` gives float32 rows,
  the stored keys as searched.
  """

  def __init__(self, key_format: str, codes: np.ndarray, scales: np.ndarray | None = None,
               centroid_ids: np.ndarray | None = None, centroids: np.ndarray | None = None):
    self.format = key_format
    self.codes = codes  # float32, uint16 (bfloat16 bits), float16 or int8 [n, d]
    self.scales = scales  # float16, int8: float32 [n]
    self.centroid_ids = centroid_ids  # all but float32: uint16 [n]
    self.centroids = centroids  # all but float32: float32 [CODEBOOK_SIZE or fewer, d]

  # -- building ------------------------------------------------------------------------------
  @classmethod
  def empty(cls, key_format: str, dim: int, centroids: np.ndarray | None = None) -> KeyStore:
    """A store of no rows; every format but float32 needs its ``centroids``
    (:func:`learn_codebook`)."""
    if key_format not in KEY_FORMATS:
      raise ValueError(f"key_format must be one of {list(KEY_FORMATS)}, got {key_format!r}")
    if key_format == "float32":
      return cls(key_format, np.zeros((0, dim), np.float32))
    if centroids is None:
      raise ValueError(f"the {key_format} key format needs its centroids (keys.learn_codebook)")
    if key_format == "bfloat16":
      return cls(key_format, np.zeros((0, dim), np.uint16), None, np.zeros(0, np.uint16),
                 np.asarray(centroids, np.float32))
    return cls(key_format, np.zeros((0, dim), _CODE_DTYPES[key_format]), np.zeros(0, np.float32),
               np.zeros(0, np.uint16), np.asarray(centroids, np.float32))

  @classmethod
  def from_float32(cls, keys: np.ndarray, key_format: str) -> KeyStore:
    """``keys`` (checked float32 ``[n, d]``) in ``key_format``; float32 keeps the array itself."""
    if key_format == "float32":
      return cls(key_format, keys)
    store = cls.empty(key_format, keys.shape[1], learn_codebook(keys))
    store.codes, store.scales, store.centroid_ids = encode(keys, store)
    return store

  def with_rows(self, keys: np.ndarray) -> KeyStore:
    """A new store: these rows, then ``keys`` (float32 ``[m, d]``) coded alike."""
    codes, scales, ids = encode(keys, self)
    if self.format == "float32":
      return KeyStore(self.format, np.concatenate([self.codes, codes]))
    return KeyStore(self.format, np.concatenate([self.codes, codes]),
                    None if scales is None else np.concatenate([self.scales, scales]),
                    np.concatenate([self.centroid_ids, ids]), self.centroids)

  # -- reading -------------------------------------------------------------------------------
  def __len__(self) -> int:
    return self.codes.shape[0]

  @property
  def dim(self) -> int:
    return self.codes.shape[1]

  def take(self, ids) -> np.ndarray:
    """float32 rows ``[..., d]`` of ``ids`` (valid row numbers), as searched."""
    # np.take: 1.6x faster than fancy indexing for these random row gathers.
    codes = np.take(self.codes, ids, axis=0)
    if self.format == "float32":
      return codes
    assert self.centroids is not None and self.centroid_ids is not None
    if self.scales is None:  # bfloat16
      rows = _bfloat16_to_float32(codes)
    else:
      rows = codes.astype(np.float32)
      rows *= np.take(self.scales, ids)[..., None]
    rows += np.take(self.centroids, np.take(self.centroid_ids, ids), axis=0)
    return rows

  def rows(self, start: int, stop: int) -> np.ndarray:
    """float32 rows ``start:stop`` (the array itself for float32, else a decoded copy)."""
    if self.format == "float32":
      return self.codes[start:stop]
    return self.take(np.arange(start, min(stop, len(self)), dtype=np.int64))

  def float32(self) -> np.ndarray:
    """All keys as float32 ``[n, d]``: the array itself for float32, else a decoded copy (as
    large as float32 keys: for building an index that keeps no reference to it)."""
    if self.format == "float32":
      return self.codes
    out = np.empty((len(self), self.dim), np.float32)
    for start in range(0, len(self), ROWS_PER_CHUNK):
      out[start:start + ROWS_PER_CHUNK] = self.rows(start, start + ROWS_PER_CHUNK)
    return out

  def bytes_per_row(self) -> float:
    """Bytes each row takes (the centroids, a fixed ``CODEBOOK_SIZE x d`` floats, not counted)."""
    per_row = self.codes.itemsize * self.dim
    if self.centroid_ids is not None:
      per_row += self.centroid_ids.itemsize
    if self.scales is not None:
      per_row += self.scales.itemsize
    return float(per_row)

  def arrays(self) -> dict:
    extra = {"key_scales": self.scales, "key_centroid_ids": self.centroid_ids,
             "key_centroids": self.centroids}
    return {"keys": self.codes, **{name: extra[name] for name in self.array_names(self.format)[1:]}}

  @staticmethod
  def array_names(key_format: str) -> list[str]:
    if key_format in ("float16", "int8"):
      return ["keys", "key_scales", "key_centroid_ids", "key_centroids"]
    if key_format == "bfloat16":
      return ["keys", "key_centroid_ids", "key_centroids"]
    return ["keys"]

  @classmethod
  def from_arrays(cls, arrays: dict, key_format: str, n: int, d: int) -> KeyStore:
    """The store saved as ``arrays`` (:meth:`arrays`), shapes and dtypes checked."""
    expected = _CODE_DTYPES[key_format]
    codes = np.asarray(arrays["keys"])
    if codes.dtype != expected or codes.shape != (n, d):
      raise ValueError(f"keys array has shape {codes.shape} dtype {codes.dtype}, expected "
                       f"({n}, {d}) {np.dtype(expected).name} for the {key_format} key format")
    if key_format == "float32":
      return cls(key_format, codes)
    ids, centroids = (np.asarray(arrays[name]) for name in ("key_centroid_ids", "key_centroids"))
    scales = None
    if key_format in ("float16", "int8"):
      scales = np.asarray(arrays["key_scales"])
      if scales.dtype != np.float32 or scales.shape != (n,) or not np.all(np.isfinite(scales)):
        raise ValueError(f"key_scales must be finite float32 [{n}], got {scales.shape} "
                         f"{scales.dtype}")
    if (centroids.dtype != np.float32 or centroids.ndim != 2 or centroids.shape[1] != d
        or not 1 <= centroids.shape[0] <= CODEBOOK_SIZE or not np.all(np.isfinite(centroids))):
      raise ValueError(f"key_centroids must be finite float32 [1..{CODEBOOK_SIZE}, {d}], got "
                       f"{centroids.shape} {centroids.dtype}")
    if ids.dtype != np.uint16 or ids.shape != (n,) or (n and int(ids.max()) >= centroids.shape[0]):
      raise ValueError(f"key_centroid_ids must be uint16 [{n}] below {centroids.shape[0]}")
    return cls(key_format, codes, scales, ids, centroids)


def encode(keys: np.ndarray, like: KeyStore):
  """``(codes, scales, centroid ids)`` of float32 ``keys`` in ``like``'s format (and centroids)."""
  if like.format == "float32":
    return keys, None, None
  n = keys.shape[0]
  bfloat16 = like.format == "bfloat16"
  codes = np.empty(keys.shape, _CODE_DTYPES[like.format])
  scales = np.empty(n, np.float32)
  ids = np.empty(n, np.uint16)
  centroids = like.centroids
  assert centroids is not None
  codebook = _Codebook(centroids)
  for start in range(0, n, ROWS_PER_CHUNK):
    rows = keys[start:start + ROWS_PER_CHUNK]
    nearest = codebook.nearest(rows)
    residual = rows - centroids[nearest]
    ids[start:start + len(rows)] = nearest
    if bfloat16:
      codes[start:start + len(rows)] = residual.astype(jnp.bfloat16).view(np.uint16)
      continue
    largest = np.abs(residual).max(axis=1)
    # The scale maps the largest entry to 127 (int8) or 1 (float16); an all-zero residual keeps
    # scale 0 and codes 0.
    scale = (largest / 127 if like.format == "int8" else largest).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    scaled = residual / safe[:, None]
    codes[start:start + len(rows)] = (np.clip(np.rint(scaled), -127, 127)
                                      if like.format == "int8" else scaled)
    scales[start:start + len(rows)] = scale
  if bfloat16:
    return codes, None, ids
  if n and not np.all(np.isfinite(scales)):  # keys within scaling.MAX_MAGNITUDE never get here
    raise ValueError(f"keys beyond {scaling.MAX_MAGNITUDE:.3g} cannot be coded in {like.format}")
  return codes, scales, ids
