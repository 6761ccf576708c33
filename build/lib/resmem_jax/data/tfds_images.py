"""Any TensorFlow Datasets (TFDS) image classification set, held in memory (mnist, cifar10, ...).

A TFDS set qualifies when its supervised keys are ``(image, label)`` with a uint8
``tfds.features.Image`` input of known channel count and a ``tfds.features.ClassLabel`` label;
shape, class count and splits come from the builder's info, so no set needs an entry of its own.
"train" is TFDS's train split, "test" TFDS's "test" (or "validation" where a set has no test
split); our "validation" is carved from "train" (``resmem_jax.data.in_memory``).

Images of varying size need ``data.image_size``: then every image is resized (bilinear) to
``image_size`` x ``image_size`` and rounded back to uint8 while reading. A set whose arrays would
exceed :data:`MAX_IN_MEMORY_BYTES` is refused before it is read.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from resmem_jax.data import augment
from resmem_jax.data import in_memory
from resmem_jax.data import tfds_prepare

SCALE = 255.0  # uint8 pixels
MAX_IN_MEMORY_BYTES = 16 << 30
READ_BATCH = 4096  # examples per tf.data batch while reading a split into memory
NOT_CLASSIFICATION = "it needs an Image input and a ClassLabel label"


@dataclasses.dataclass(frozen=True)
class ImageFeatures:
  """What the data set's TFDS builder says about its supervised ``(image, label)`` pair."""
  image_shape: tuple  # (H, W, C); H and W are None for images of varying size
  num_classes: int


def image_classification_features(builder, name: str) -> ImageFeatures:
  """The builder's image and label features; ValueError when it is no image classification set."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  info = builder.info
  keys = info.supervised_keys
  if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
    raise ValueError(f"data.name={name!r} is a TFDS data set but not an image classification set "
                     f"({NOT_CLASSIFICATION}; its supervised keys are {keys!r})")
  image, label = info.features[keys[0]], info.features[keys[1]]
  if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f"data.name={name!r} is a TFDS data set but not an image classification set "
                     f"({NOT_CLASSIFICATION}; it has {type(image).__name__} -> "
                     f"{type(label).__name__})")
  if np.dtype(image.np_dtype) != np.uint8 or image.shape[-1] is None:
    raise ValueError(f"data.name={name!r} has {np.dtype(image.np_dtype)} images of shape "
                     f"{image.shape}; only uint8 images with a fixed channel count are supported")
  return ImageFeatures(tuple(image.shape), int(label.num_classes))


def input_shape(features: ImageFeatures, image_size: int | None, name: str) -> tuple[int, ...]:
  """(H, W, C) of the arrays held in memory."""
  height, width, channels = features.image_shape
  if image_size is not None:
    return (image_size, image_size, channels)
  if height is None or width is None:
    raise ValueError(f"data.name={name!r} has images of varying size {features.image_shape}; set "
                     f"data.image_size (e.g. --config.data.image_size=64) to resize every image "
                     f"to image_size x image_size")
  return (height, width, channels)


def tfds_test_split(builder, name: str) -> str:
  """TFDS's "test" split, else its "validation" split."""
  recorded = set(builder.info.splits)
  if "train" not in recorded and recorded:
    raise ValueError(f"data.name={name!r} has no 'train' split (it has {sorted(recorded)})")
  if not recorded or "test" in recorded:  # nothing recorded (tfds.testing.mock_data): TFDS's usual
    return "test"
  if "validation" in recorded:
    return "validation"
  raise ValueError(f"data.name={name!r} has neither a 'test' nor a 'validation' split to test on "
                   f"(it has {sorted(recorded)})")


def check_fits_in_memory(builder, tfds_splits, shape: tuple[int, ...], name: str) -> None:
  recorded = builder.info.splits
  examples = sum(int(recorded[s].num_examples) for s in tfds_splits if s in recorded)
  needed = examples * math.prod(shape)
  if needed > MAX_IN_MEMORY_BYTES:
    raise ValueError(f"data.name={name!r} needs about {needed / 2**30:.1f} GiB of uint8 images "
                     f"({examples} of shape {shape}), more than the {MAX_IN_MEMORY_BYTES >> 30} "
                     f"GiB held in memory; set a smaller data.image_size or use a streamed set")


def read_split(builder, split: str, image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
  """A whole split as (uint8 images, int32 labels); resized when ``image_size`` is set."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def resize(image, label):
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8), label

  dataset = builder.as_dataset(split=split, as_supervised=True)
  if image_size is not None:
    dataset = dataset.map(resize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Iterate in batches: batch_size=-1 aborts the process under tfds.testing.mock_data.
  images, labels = [], []
  for image, label in tfds.as_numpy(dataset.batch(READ_BATCH)):
    images.append(np.asarray(image, dtype=np.uint8))
    labels.append(np.asarray(label, dtype=np.int32))
  if not images:
    raise ValueError(f"TFDS split {split!r} of {builder.name!r} is empty")
  return np.concatenate(images), np.concatenate(labels)


class TfdsImages(in_memory.InMemoryImages):
  """A TFDS image classification set held in memory (every ``data.name`` not built in)."""

  @functools.cached_property
  def builder(self):
    """The TFDS builder object (metadata only; :meth:`_load` prepares it)."""
    return tfds_prepare.unprepared_builder(self.settings.name, self.settings.data_dir)

  @property
  def mirror_symmetric(self) -> bool:
    # The builder's canonical name: "cifar10:3.0.2" flips like "cifar10".
    return self.builder.name in augment.MIRROR_SYMMETRIC

  def _load(self) -> in_memory.ImageArrays:
    s = self.settings
    features = image_classification_features(self.builder, s.name)
    shape = input_shape(features, s.image_size, s.name)
    builder = tfds_prepare.prepare(self.builder, s.manual_dir)
    test = tfds_test_split(builder, s.name)
    check_fits_in_memory(builder, ("train", test), shape, s.name)
    train_images, train_labels = read_split(builder, "train", s.image_size)
    test_images, test_labels = read_split(builder, test, s.image_size)
    if train_images.shape[1:] != shape:
      raise ValueError(f"{s.name!r} images have shape {train_images.shape[1:]}, expected {shape}")
    return in_memory.image_arrays(s.name, train_images, train_labels, test_images, test_labels,
                                  num_classes=features.num_classes, scale=SCALE)
