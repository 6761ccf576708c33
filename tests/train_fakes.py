"""Tiny in-memory data sets with the ``resmem_jax.data`` Dataset interface, for the training tests.

``ImageFake``: four Gaussian clusters in 4x4x1 "images" (learnable), split deterministically into
train / validation / test. ``TokenFake``: windows of a repeating token pattern whose next token is
a function of the current one. Both give ``{"inputs", "labels"}`` batches (plus ``"mask"`` on eval
batches, and on the token train batches), and their train batches depend only on (seed, step), as
the real data sets' do.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Info:
  name: str
  num_classes: int
  input_shape: tuple
  input_dtype: str
  split_sizes: dict


class _FakeDataset:
  """Eval batches in order, the last one padded (mask False), from ``examples(split)``."""
  info: Info

  def num_examples(self, split):
    return self.info.split_sizes[split]

  def eval_batches(self, split, global_batch_size):
    inputs, labels = self.examples(split)
    for start in range(0, len(labels), global_batch_size):
      x, y = inputs[start:start + global_batch_size], labels[start:start + global_batch_size]
      pad = global_batch_size - len(y)
      mask = np.zeros((global_batch_size,) + y.shape[1:], bool)
      mask[:len(y)] = True
      yield {"inputs": np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]),
             "labels": np.concatenate([y, np.zeros((pad,) + y.shape[1:], y.dtype)]),
             "mask": mask}


class ImageFake(_FakeDataset):
  NUM_CLASSES = 4
  SHAPE = (4, 4, 1)
  SIZES = {"train": 96, "validation": 24, "test": 24}

  def __init__(self):
    self.info = Info("fake_images", self.NUM_CLASSES, self.SHAPE, "float32", dict(self.SIZES))

  def examples(self, split):
    rng = np.random.default_rng(1234)
    centres = rng.normal(size=(self.NUM_CLASSES,) + self.SHAPE).astype(np.float32)
    n = sum(self.SIZES.values())
    labels = rng.integers(0, self.NUM_CLASSES, n).astype(np.int32)
    images = centres[labels] + 0.7 * rng.normal(size=(n,) + self.SHAPE).astype(np.float32)
    start = {"train": 0, "validation": self.SIZES["train"],
             "test": self.SIZES["train"] + self.SIZES["validation"]}[split]
    rows = slice(start, start + self.SIZES[split])
    return images[rows], labels[rows]

  def train_batches(self, global_batch_size, seed, start_step=0):
    images, labels = self.examples("train")
    step = start_step
    while True:
      idx = np.random.default_rng([seed, step]).choice(len(labels), global_batch_size,
                                                        replace=False)
      yield {"inputs": images[idx], "labels": labels[idx]}
      step += 1


class TokenFake(_FakeDataset):
  VOCAB, LENGTH = 8, 6
  SIZES = {"train": 64, "validation": 16, "test": 16}
  PATTERN = np.array([0, 3, 1, 4, 1, 5, 2, 6], np.int32)  # next token: a function of this one

  def __init__(self):
    self.info = Info("fake_text", self.VOCAB, (self.LENGTH,), "int32", dict(self.SIZES))

  def _rows(self, starts):
    idx = (np.asarray(starts)[:, None] + np.arange(self.LENGTH + 1)[None]) % len(self.PATTERN)
    seq = self.PATTERN[idx]
    return seq[:, :-1], seq[:, 1:]

  def examples(self, split):
    return self._rows(np.arange(self.SIZES[split]) % len(self.PATTERN))

  def train_batches(self, global_batch_size, seed, start_step=0):
    step = start_step
    while True:
      starts = np.random.default_rng([seed, step]).integers(0, 8, global_batch_size)
      inputs, labels = self._rows(starts)
      yield {"inputs": inputs, "labels": labels, "mask": np.ones(labels.shape, bool)}
      step += 1
