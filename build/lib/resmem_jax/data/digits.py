"""``digits``: scikit-learn's embedded 8x8 handwritten digits, the default data set.

1797 images bundled with scikit-learn (no download, no TensorFlow), values 0..16, split once by a
fixed permutation into 1437 training and 360 test images.
"""
from __future__ import annotations

import numpy as np

from resmem_jax.data import in_memory

# Size of the fixed held-out test split (about 20 % of 1797).
TEST_SIZE = 360
SPLIT_SEED = 0
NUM_CLASSES = 10
SCALE = 16.0  # the largest pixel value


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train images uint8 [1437, 8, 8, 1], train labels, test images [360, 8, 8, 1], labels)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  bunch = datasets.load_digits()
  images = bunch.images.astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
  test, train = np.sort(order[:TEST_SIZE]), np.sort(order[TEST_SIZE:])
  return images[train], labels[train], images[test], labels[test]


class Digits(in_memory.InMemoryImages):
  """The embedded digits behind the common interface (``data.name=digits``)."""

  def _load(self) -> in_memory.ImageArrays:
    return in_memory.image_arrays(self.settings.name, *load_digits(), num_classes=NUM_CLASSES,
                                  scale=SCALE)
