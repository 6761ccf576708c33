"""A tiny in-memory data source with resmem_jax.data's API, for the training tests.

Four Gaussian clusters in 4x4x1 "images" (learnable), split deterministically into train /
validation / test. Batches depend only on (seed, step), as the real pipeline's do.
"""
import collections

import numpy as np

DatasetInfo = collections.namedtuple("DatasetInfo", "name num_classes input_shape split_sizes")

NUM_CLASSES = 4
SHAPE = (4, 4, 1)
SIZES = {"train": 96, "validation": 24, "test": 24}


def _split(split):
  rng = np.random.default_rng(1234)
  centres = rng.normal(size=(NUM_CLASSES,) + SHAPE).astype(np.float32)
  n = sum(SIZES.values())
  labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  images = centres[labels] + 0.7 * rng.normal(size=(n,) + SHAPE).astype(np.float32)
  start = {"train": 0, "validation": SIZES["train"],
           "test": SIZES["train"] + SIZES["validation"]}[split]
  sl = slice(start, start + SIZES[split])
  return images[sl], labels[sl]


def dataset_info(data_cfg):
  return DatasetInfo("fake", NUM_CLASSES, SHAPE, dict(SIZES))


def num_examples(data_cfg, split):
  return SIZES[split]


def train_batches(data_cfg, global_batch_size, seed, start_step=0):
  images, labels = _split("train")
  step = start_step
  while True:
    idx = np.random.default_rng([seed, step]).choice(len(labels), global_batch_size,
                                                      replace=False)
    yield {"image": images[idx], "label": labels[idx]}
    step += 1


def eval_batches(data_cfg, split, global_batch_size):
  images, labels = _split(split)
  for start in range(0, len(labels), global_batch_size):
    img, lab = images[start:start + global_batch_size], labels[start:start + global_batch_size]
    pad = global_batch_size - len(lab)
    yield {"image": np.concatenate([img, np.zeros((pad,) + SHAPE, np.float32)]),
           "label": np.concatenate([lab, np.zeros(pad, np.int32)]),
           "mask": np.arange(global_batch_size) < len(lab)}


class TokenSource:
  """Token batches {"inputs","targets","mask"} [b, L] from a repeating sequence (learnable)."""
  VOCAB, LENGTH = 8, 6
  SIZES = {"train": 64, "validation": 16, "test": 16}

  @classmethod
  def _rows(cls, starts):
    pattern = np.array([0, 3, 1, 4, 1, 5, 2, 6], np.int32)  # next token is a function of this one
    idx = (np.asarray(starts)[:, None] + np.arange(cls.LENGTH + 1)[None]) % len(pattern)
    seq = pattern[idx]
    return seq[:, :-1], seq[:, 1:]

  @classmethod
  def dataset_info(cls, data_cfg):
    return DatasetInfo("fake_text", cls.VOCAB, (cls.LENGTH,), dict(cls.SIZES))

  @classmethod
  def num_examples(cls, data_cfg, split):
    return cls.SIZES[split]

  @classmethod
  def train_batches(cls, data_cfg, global_batch_size, seed, start_step=0):
    step = start_step
    while True:
      starts = np.random.default_rng([seed, step]).integers(0, 8, global_batch_size)
      inputs, targets = cls._rows(starts)
      yield {"inputs": inputs, "targets": targets, "mask": np.ones_like(inputs)}
      step += 1

  @classmethod
  def eval_batches(cls, data_cfg, split, global_batch_size):
    n = cls.SIZES[split]
    for start in range(0, n, global_batch_size):
      rows = np.arange(start, start + global_batch_size)
      inputs, targets = cls._rows(rows % 8)
      mask = np.repeat((rows < n)[:, None], cls.LENGTH, axis=1).astype(np.int32)
      yield {"inputs": inputs, "targets": targets, "mask": mask}
