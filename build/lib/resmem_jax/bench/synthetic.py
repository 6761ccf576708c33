"""Clustered Gaussian points: the test and benchmark data for nearest-neighbour search.

Embeddings of a trained network form class clusters, so uniform random points would make the
search look harder (and easier to partition) than it is in practice.
"""
from __future__ import annotations

import numpy as np


def clustered_points(num_points: int, dim: int, num_clusters: int = 100, spread: float = 0.25,
                     seed: int = 0, num_queries: int = 0):
  """``(points [n, d], queries [q, d])`` float32 around ``num_clusters`` unit-normal centres.

  Queries are drawn from the same mixture, independently of the points.
  """
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_clusters, dim)).astype(np.float32)

  def draw(count):
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):  # bounded temporaries at 1M points
      stop = min(count, start + 100_000)
      ids = rng.integers(0, num_clusters, size=stop - start)
      out[start:stop] = centres[ids] + spread * rng.standard_normal((stop - start, dim), np.float32)
    return out

  return draw(num_points), draw(num_queries)
