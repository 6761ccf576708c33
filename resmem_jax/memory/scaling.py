"""Power-of-two scaling that keeps float32 distance arithmetic in range, and its input limit.

Squared distances overflow float32 once entries reach about 1e19 (keys of magnitude 1e20 used to
give infinite distances and id -1) and underflow below about 1e-19 (where every key looks equally
near). Each search index therefore works on keys centred on their mean and, when their largest
centred entry lies outside ``[2**-SAFE_EXPONENT, 2**SAFE_EXPONENT]``, scaled by a power of two
that brings it into ``[0.5, 1)``. Multiplying by a power of two is exact (short of subnormals), so
rankings do not change; ordinary data is left unscaled, so ScaNN's absolute settings
(``quantization_threshold``) act on it as they always did. Centring also removes the cancellation that made
the norm expansion ``|q|^2 - 2 q.k + |k|^2`` useless for keys sharing a large offset. A query more
than ``2**SAFE_EXPONENT`` times larger than every key is scaled further on its own
(:func:`scaled_queries`): one query's scores rank the keys alike at any positive scale. Returned
distances never come from scaled values: the memory re-ranks the candidates by directly computed
``|q - k|`` (:func:`resmem_jax.memory.exact.rerank_exact`).

Scaling rather than refusing: keys and queries of any magnitude up to :data:`MAX_MAGNITUDE`
(``2**100``, about 1.3e30) work; larger entries are refused
(:func:`resmem_jax.memory.checks.vectors`) because the distance between two such points can
exceed float32's largest value (about 3.4e38) and could not be returned.
"""
from __future__ import annotations

import numpy as np

MAX_MAGNITUDE = 2.0 ** 100
# Entries within 2**+-SAFE_EXPONENT keep squared distances and dot products (d up to 2**20) far
# from float32's range limits.
SAFE_EXPONENT = 30


def exponent(magnitudes) -> np.ndarray:
  """The smallest int32 ``e`` with ``|x| < 2**e`` for each of ``magnitudes`` (0 for 0)."""
  return np.frexp(np.asarray(magnitudes, np.float32))[1].astype(np.int32)


def center(keys: np.ndarray) -> np.ndarray:
  """The keys' mean, float32 (summed in float64, so that it cannot overflow)."""
  return keys.mean(axis=0, dtype=np.float64).astype(np.float32)


def key_exponent(centred: np.ndarray) -> int:
  """The exponent ``e`` to scale centred keys by (``2**-e``): 0 when their largest entry is
  within ``2**+-SAFE_EXPONENT`` (or there is none), else :func:`exponent` of it."""
  if centred.size == 0:
    return 0
  largest = int(exponent(max(float(centred.max()), -float(centred.min()))))
  return 0 if -SAFE_EXPONENT <= largest <= SAFE_EXPONENT else largest


def scaled(values: np.ndarray, exp) -> np.ndarray:
  """``values * 2**-exp`` as float32 (exact short of subnormals)."""
  return np.ldexp(values, -np.asarray(exp, np.int32)).astype(np.float32, copy=False)


def scaled_queries(centred: np.ndarray, key_exp: int) -> tuple[np.ndarray, np.ndarray]:
  """Centred queries ``[q, d]`` on the keys' scale, or smaller where a query outgrows the keys.

  Returns ``(q', w)``: ``q' = q 2**-m`` and ``w = 2**(key_exp - m)`` in ``[0, 1]``, where ``m`` is
  ``key_exp``, or the row's own exponent when that exceeds ``key_exp + SAFE_EXPONENT``. With keys
  ``k' = k 2**-key_exp``, ``|q - k|^2 = |q|^2 + 2**(m + key_exp) (w |k'|^2 - 2 q'.k')``, so the
  score ``w |k'|^2 - 2 q'.k'`` ranks one query's keys as their distances do, and stays finite.
  """
  m = query_exponents(centred, key_exp)
  weights = np.ldexp(np.float32(1), key_exp - m).astype(np.float32)
  return scaled(centred, m[:, None]), weights


def query_exponents(centred: np.ndarray, key_exp: int) -> np.ndarray:
  """int32 ``m`` per row of :func:`scaled_queries` (``q' = q 2**-m``; ``w = 2**(key_exp - m)``
  underflows to 0 for a query beyond ``2**149`` times the keys, so callers needing the exact
  scale take ``m``)."""
  rows = np.zeros(centred.shape[0], np.int32)
  if centred.size:
    rows = exponent(np.maximum(centred.max(axis=1), -centred.min(axis=1)))
  return np.where(rows > key_exp + SAFE_EXPONENT, rows, np.int32(key_exp)).astype(np.int32)
