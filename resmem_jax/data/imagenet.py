"""ImageNet (``imagenet2012``) streamed from TFDS with tf.data, behind the same batch interface.

The train split is too large for memory, so examples are read from the prepared TFRecords:
validation is carved as the first ``val_fraction`` of TFDS's train split (TFDS already shuffled
the examples when it prepared them), ``train_fraction`` keeps a prefix of the rest, and each
process reads its own even part (``tfds.split_for_jax_process``). Each epoch shuffles files and
examples with seeds from ``(seed, epoch)``; resuming at ``start_step`` skips the still-encoded
records of the current epoch (no JPEG decoding) instead of replaying earlier batches. Crops and
flips use stateless ops seeded by ``(seed, epoch, position)``. Images are ``data.image_size``
(default 224) square, normalised with the usual published channel statistics.
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np

from resmem_jax.data import base
from resmem_jax.data import tfds_prepare

TFDS_NAME = "imagenet2012"
# TFDS's split that serves as our held-out test split (ImageNet publishes labels for it only).
TFDS_TEST_SPLIT = "validation"
DEFAULT_IMAGE_SIZE = 224

# Standard ImageNet channel statistics for images scaled to [0, 1].
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Eval resizes the shorter side to image_size / CENTER_CROP_FRACTION, then centre-crops.
CENTER_CROP_FRACTION = 0.875
SHUFFLE_BUFFER = 16384


def split_specs(num_train: int, val_fraction: float, train_fraction: float) -> dict[str, str]:
  """TFDS split strings for our "train", "validation" and "test"."""
  if not 0.0 <= float(val_fraction) < 1.0:
    raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
  if not 0.0 < float(train_fraction) <= 1.0:
    raise ValueError(f"data.train_fraction must be in (0, 1], got {train_fraction!r}")
  num_val = int(round(val_fraction * num_train))
  num_keep = max(1, int(round(train_fraction * (num_train - num_val))))
  return {
      "train": f"train[{num_val}:{num_val + num_keep}]",
      "validation": f"train[:{num_val}]",
      "test": TFDS_TEST_SPLIT,
  }


def _split_sizes(builder, specs: dict[str, str]) -> dict[str, int]:
  return {ours: int(builder.info.splits[tfds_split].num_examples)
          for ours, tfds_split in specs.items()}


def _decode_train(image_bytes, seed, image_size: int):
  import tensorflow as tf
  shape = tf.image.extract_jpeg_shape(image_bytes)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  offset_y, offset_x, _ = tf.unstack(begin)
  height, width, _ = tf.unstack(size)
  window = tf.stack([offset_y, offset_x, height, width])
  image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear")
  return tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])


def _decode_eval(image_bytes, image_size: int):
  import tensorflow as tf
  image = tf.io.decode_jpeg(image_bytes, channels=3)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (image_size / CENTER_CROP_FRACTION) / tf.reduce_min(shape)
  resized = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(image, resized, method="bilinear")
  top = (resized[0] - image_size) // 2
  left = (resized[1] - image_size) // 2
  return image[top:top + image_size, left:left + image_size]


def _normalise(image):
  import tensorflow as tf
  return (tf.cast(image, tf.float32) / 255.0 - MEAN) / STD


def _encoded(builder, split: str, shuffle_seed: int | None):
  import tensorflow_datasets as tfds
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed) if shuffle_seed is not None else None
  return builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
      decoders={"image": tfds.decode.SkipDecoding()})


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.default_rng([2, int(seed), int(epoch)]).integers(0, 2**31 - 1))


class ImageNet(base.Dataset):
  """Streams ``imagenet2012`` batches; the TFDS builder is prepared on first use."""

  @functools.cached_property
  def builder(self):
    return tfds_prepare.tfds_builder(TFDS_NAME, self.settings.data_dir, self.settings.manual_dir)

  @property
  def image_size(self) -> int:
    return self.settings.image_size or DEFAULT_IMAGE_SIZE

  @functools.cached_property
  def specs(self) -> dict[str, str]:
    """TFDS split strings of our "train", "validation" and "test"."""
    num_train = int(self.builder.info.splits["train"].num_examples)
    return split_specs(num_train, self.settings.val_fraction, self.settings.train_fraction)

  @functools.cached_property
  def info(self) -> base.DatasetInfo:
    return base.DatasetInfo(
        name=self.settings.name,
        num_classes=int(self.builder.info.features["label"].num_classes),
        input_shape=(self.image_size, self.image_size, 3), input_dtype="float32",
        split_sizes=_split_sizes(self.builder, self.specs))

  def _local_split(self, split: str, process_index: int, process_count: int) -> str:
    import tensorflow_datasets as tfds
    return tfds.split_for_jax_process(self.specs[split], process_index=process_index,
                                      process_count=process_count)

  def _train_batches(self, global_batch_size, seed, start_step, part, process_index,
                     process_count) -> Iterator[dict[str, np.ndarray]]:
    import tensorflow as tf
    import tensorflow_datasets as tfds
    local_batch = part.stop - part.start
    augment = self.settings.augment
    local_split = self._local_split("train", process_index, process_count)
    local_size = int(self.builder.info.splits[local_split].num_examples)
    if local_size < 1:
      raise ValueError("the ImageNet training split of this process is empty")
    image_size = self.image_size
    position = start_step * local_batch
    epoch, offset = divmod(position, local_size)
    pending_images, pending_labels = [], []
    while True:
      epoch_seed = _epoch_seed(seed, epoch)
      dataset = _encoded(self.builder, local_split, epoch_seed)
      dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=epoch_seed, reshuffle_each_iteration=False)
      dataset = dataset.enumerate().skip(offset)

      def decode(index, example, epoch_seed=epoch_seed):
        if augment:
          example_seed = tf.stack([tf.constant(epoch_seed, tf.int64), index])
          image = _decode_train(example["image"], example_seed, image_size)
        else:
          image = _decode_eval(example["image"], image_size)
        return _normalise(image), tf.cast(example["label"], tf.int32)

      dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      dataset = dataset.batch(local_batch).prefetch(tf.data.AUTOTUNE)
      for images, labels in tfds.as_numpy(dataset):
        pending_images.append(images)
        pending_labels.append(labels)
        while sum(len(x) for x in pending_labels) >= local_batch:
          all_images = np.concatenate(pending_images)
          all_labels = np.concatenate(pending_labels)
          yield {"inputs": all_images[:local_batch], "labels": all_labels[:local_batch]}
          pending_images, pending_labels = [all_images[local_batch:]], [all_labels[local_batch:]]
      epoch, offset = epoch + 1, 0

  def _eval_batches(self, split, global_batch_size, part, process_index,
                    process_count) -> Iterator[dict[str, np.ndarray]]:
    import tensorflow as tf
    import tensorflow_datasets as tfds
    local_batch = part.stop - part.start
    total = self.info.split_sizes[split]
    # Every process yields as many batches as the process with the largest part needs.
    largest_part = -(-total // process_count)  # ceiling division
    num_batches = -(-largest_part // local_batch)
    if total == 0:
      return
    dataset = _encoded(self.builder, self._local_split(split, process_index, process_count), None)
    image_size = self.image_size
    dataset = dataset.map(
        lambda ex: (_normalise(_decode_eval(ex["image"], image_size)),
                    tf.cast(ex["label"], tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(local_batch)
    shape = (local_batch, image_size, image_size, 3)
    batches = iter(tfds.as_numpy(dataset))
    for _ in range(num_batches):
      images = np.zeros(shape, np.float32)
      labels = np.zeros(local_batch, np.int32)
      mask = np.zeros(local_batch, bool)
      got = next(batches, None)
      if got is not None:
        count = len(got[1])
        images[:count], labels[:count], mask[:count] = got[0], got[1], True
      yield {"inputs": images, "labels": labels, "mask": mask}
