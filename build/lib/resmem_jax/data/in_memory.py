"""Image classification sets held in host memory as uint8 arrays (digits and TFDS image sets).

A subclass only loads its arrays (:meth:`InMemoryImages._load`); splitting, batching,
augmentation and normalisation are shared here:

* "validation" is carved from the source's training split by a fixed permutation
  (``val_fraction``, ``split_seed``), ``train_fraction`` keeps a nested subset of the rest, and
  "test" is the source's test split (``resmem_jax.data.splits``).
* Training batches follow :class:`resmem_jax.data.splits.TrainOrder`; augmentation zero-pads by
  H/8 and crops at random, mirroring only the sets in ``augment.MIRROR_SYMMETRIC``, with the
  randomness drawn for the whole global batch from ``(seed, step)`` and then sliced per process.
* Images become float32 ``(x / scale - mean) / std`` with the per-channel mean and standard
  deviation of the source's whole training split.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Iterator

import numpy as np

from resmem_jax.data import augment as augment_lib
from resmem_jax.data import base
from resmem_jax.data import splits


@dataclasses.dataclass(frozen=True)
class ImageArrays:
  """A whole image set in memory, read-only: the source's train and test splits."""
  train_images: np.ndarray  # uint8 [n, H, W, C]
  train_labels: np.ndarray  # int32 [n]
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  scale: float  # raw pixel value that maps to 1.0
  mean: np.ndarray  # per-channel statistics of train_images / scale
  std: np.ndarray


def image_arrays(name: str, train_images: np.ndarray, train_labels: np.ndarray,
                 test_images: np.ndarray, test_labels: np.ndarray, num_classes: int,
                 scale: float) -> ImageArrays:
  """Checked, read-only :class:`ImageArrays` with the training images' channel statistics."""
  for split, images, labels in (("train", train_images, train_labels),
                                ("test", test_images, test_labels)):
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
      raise ValueError(f"{name!r} {split} split: expected uint8 images [n, H, W, C] and n labels, "
                       f"got {images.dtype} {images.shape} and {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f"{name!r} {split} labels lie in [{labels.min()}, {labels.max()}], outside "
                       f"[0, {num_classes})")
  if test_images.shape[1:] != train_images.shape[1:]:
    raise ValueError(f"{name!r} test images have shape {test_images.shape[1:]}, train images "
                     f"{train_images.shape[1:]}")
  mean, std = augment_lib.channel_stats(train_images, scale)
  arrays = (train_images, train_labels.astype(np.int32), test_images, test_labels.astype(np.int32))
  for array in arrays:
    array.setflags(write=False)
  return ImageArrays(*arrays, num_classes=num_classes, scale=scale, mean=mean, std=std)


class InMemoryImages(base.Dataset):
  """An image set read once into memory; see the module docstring."""

  @abc.abstractmethod
  def _load(self) -> ImageArrays:
    """Reads the whole data set (called once per instance)."""

  @functools.cached_property
  def arrays(self) -> ImageArrays:
    return self._load()

  @property
  def mirror_symmetric(self) -> bool:
    """Whether a horizontal mirror image keeps the label (augmentation flips only then)."""
    return self.settings.name in augment_lib.MIRROR_SYMMETRIC

  @functools.cached_property
  def split_indices(self) -> dict[str, np.ndarray]:
    """Rows of ``arrays.train_*`` ("train", "validation") and ``arrays.test_*`` ("test")."""
    s = self.settings
    train, validation = splits.carve_validation(len(self.arrays.train_labels), s.val_fraction,
                                                s.split_seed)
    return {"train": splits.subsample(train, s.train_fraction, s.split_seed),
            "validation": validation,
            "test": np.arange(len(self.arrays.test_labels))}

  @functools.cached_property
  def info(self) -> base.DatasetInfo:
    return base.DatasetInfo(
        name=self.settings.name, num_classes=self.arrays.num_classes,
        input_shape=tuple(self.arrays.train_images.shape[1:]), input_dtype="float32",
        split_sizes={split: len(rows) for split, rows in self.split_indices.items()})

  def _split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, rows) of ``split``."""
    a = self.arrays
    if split == "test":
      return a.test_images, a.test_labels, self.split_indices[split]
    return a.train_images, a.train_labels, self.split_indices[split]

  def _normalise(self, images: np.ndarray) -> np.ndarray:
    a = self.arrays
    return augment_lib.normalise(images, a.scale, a.mean, a.std)

  def _train_batches(self, global_batch_size, seed, start_step, part, process_index,
                     process_count):
    images, labels, rows = self._split_arrays("train")
    order = splits.TrainOrder(len(rows), global_batch_size, seed)  # refuses an empty split
    # Pad by an eighth of the side: 4 pixels for CIFAR's 32, as in the ResNet paper.
    pad = images.shape[1] // 8 if self.settings.augment else 0
    return self._train_stream(images, labels, rows, order, start_step, part, pad,
                              self.mirror_symmetric)

  def _train_stream(self, images, labels, rows, order, start_step, part, pad,
                    flip) -> Iterator[dict[str, np.ndarray]]:
    step = start_step
    while True:
      batch_rows = rows[order.batch(step)[part]]
      batch_images = images[batch_rows]
      if pad > 0:
        offsets, flips = augment_lib.sample_crop_flip(
            splits.augmentation_rng(order.seed, step), order.global_batch_size, pad, flip)
        batch_images = augment_lib.pad_crop_flip(batch_images, offsets[part], flips[part], pad)
      yield {"inputs": self._normalise(batch_images), "labels": labels[batch_rows]}
      step += 1

  def _eval_batches(self, split, global_batch_size, part, process_index, process_count):
    images, labels, rows = self._split_arrays(split)
    return self._eval_stream(images, labels, rows, global_batch_size, process_index,
                             process_count)

  def _eval_stream(self, images, labels, rows, global_batch_size, process_index,
                   process_count) -> Iterator[dict[str, np.ndarray]]:
    if len(rows) == 0:
      return
    for positions, mask in splits.eval_batch_indices(len(rows), global_batch_size,
                                                     process_index, process_count):
      batch_rows = rows[positions]
      batch_images = self._normalise(images[batch_rows])
      batch_images[~mask] = 0.0
      batch_labels = np.where(mask, labels[batch_rows], 0).astype(np.int32)
      yield {"inputs": batch_images, "labels": batch_labels, "mask": mask}
