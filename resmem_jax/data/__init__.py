"""Input pipelines: every data set is a :class:`Dataset` chosen by name from one registry.

``get_dataset(settings.data)`` returns the data set of ``data.name``: a built-in one
(:data:`DATASETS`: the embedded ``digits``, streamed ``imagenet2012``, the text sets) or else any
TFDS image classification set (mnist, cifar10, svhn_cropped, emnist/letters, ...), held in
memory. The object is cheap to create; it reads its data on first use and keeps it, so a run
creates one and passes it around. Its interface (``resmem_jax.data.base``):

* ``info`` -> ``DatasetInfo(name, num_classes, input_shape, input_dtype, split_sizes)``.
* ``num_examples(split)`` for ``split`` in :data:`SPLITS`.
* ``train_batches(global_batch_size, seed, start_step=0)`` -> endless iterator of this process's
  part of every global batch, ``{"inputs", "labels"}``, a pure function of ``(seed, start_step)``.
* ``eval_batches(split, global_batch_size)`` -> each example of ``split`` exactly once, in order,
  last batch padded, ``{"inputs", "labels", "mask"}``.

``check_name(name)`` says in seconds, without reading data, whether ``get_dataset`` would accept
a name. See README.md next to this file for ``data_dir`` / ``manual_dir`` (offline preparation).
"""
from __future__ import annotations

from collections.abc import Callable

from resmem_jax import suggest
from resmem_jax.data import digits
from resmem_jax.data import imagenet
from resmem_jax.data import text
from resmem_jax.data import tfds_images
from resmem_jax.data import tfds_prepare
from resmem_jax.data.base import SPLITS, Dataset, DatasetInfo
from resmem_jax.settings import DataSettings, MissingDependency

__all__ = ["SPLITS", "Dataset", "DatasetInfo", "DATASETS", "get_dataset", "check_name",
           "known_datasets"]

# The built-in data sets; every other name is read as a TFDS image classification set.
DATASETS: dict[str, Callable[[DataSettings], Dataset]] = {
    "digits": digits.Digits,
    "imagenet2012": imagenet.ImageNet,
    "tiny_shakespeare": text.TextDataset,
    "lm1b": text.TextDataset,
    "c4": text.TextDataset,
}


def known_datasets() -> tuple[str, ...]:
  """The built-in names (any TFDS image classification set is accepted besides)."""
  return tuple(DATASETS)


def get_dataset(settings: DataSettings) -> Dataset:
  """The data set ``settings.name`` (nothing is read until it is used); see :func:`check_name`."""
  if settings.name in DATASETS:
    return DATASETS[settings.name](settings)
  check_name(settings.name)
  return tfds_images.TfdsImages(settings)


def _suggestion(name: str) -> str:
  """`` (did you mean 'x'?)`` for the closest built-in, TFDS name or TFDS config, or ""."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_names = tfds.list_builders(with_community_datasets=False)
  base_name, _, config = name.partition("/")
  if config and base_name in tfds_names:
    configs = tfds.builder_cls(base_name).builder_configs
    choices = [f"{base_name}/{c}" for c in configs]
  else:
    choices = []
  # Built-ins first: "imagenet" means imagenet2012 here, not TFDS's imagenette.
  for candidates in (choices, list(DATASETS), tfds_names):
    hint = suggest.did_you_mean(name, candidates)
    if hint:
      return hint
  return ""


def _first_sentence(err: Exception) -> str:
  """TFDS's reason without its "Failed to construct dataset ..., builder_kwargs {...}:" prefix."""
  line = (str(err).strip().splitlines() or [type(err).__name__])[0]
  line = line.split('}": ', 1)[-1]
  return line.split(". ", 1)[0].rstrip(".")[:200]


def check_name(name: str) -> None:
  """ValueError (one line) unless ``name`` is built in or a TFDS image classification set.

  Builds the TFDS builder object only (features and metadata): no data is read or prepared.
  """
  if name in DATASETS:
    return
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds_prepare.unprepared_builder(name, None)
  except MissingDependency:
    raise
  except Exception as err:  # pylint: disable=broad-except  # TFDS raises many types here
    reason = "" if isinstance(err, tfds.core.registered.DatasetNotFoundError) else \
        f" (TFDS: {_first_sentence(err)})"
    raise ValueError(f"data.name={name!r} is not a known data set{_suggestion(name)}{reason}; "
                     f"built-in: {', '.join(DATASETS)}, or any TFDS image classification set"
                     ) from None
  tfds_images.image_classification_features(builder, name)
