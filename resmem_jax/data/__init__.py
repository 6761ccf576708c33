"""Input pipelines: one interface over the embedded ``digits``, TFDS image sets and text sets.

Public functions (``data_cfg`` is the ``data`` section of a config: ``name``, ``data_dir``,
``manual_dir``, ``val_fraction``, ``train_fraction``, ``augment``; missing fields take defaults):

* ``dataset_info(data_cfg)`` -> ``DatasetInfo(name, num_classes, input_shape, split_sizes)``.
* ``train_batches(data_cfg, global_batch_size, seed, start_step=0)`` -> endless iterator of this
  process's part of every global batch, ``{"image": float32 [b, H, W, C], "label": int32 [b]}``,
  a pure function of ``(seed, start_step)``: a resumed run sees the batches an uninterrupted run
  would have seen.
* ``eval_batches(data_cfg, split, global_batch_size)`` -> each example of ``split`` ("train",
  "validation" or "test") exactly once, in order, last batch padded, plus ``"mask"`` bool [b].
* ``num_examples(data_cfg, split)``.

Names in ``resmem_jax.data.text.TEXT_DATASETS`` are handed to ``resmem_jax.data.text``, which
provides the same four functions for token data. See README.md next to this file for
``data_dir`` / ``manual_dir`` (offline preparation of TFDS data sets).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Iterator

import numpy as np

from resmem_jax.data import augment as augment_lib
from resmem_jax.data import sources
from resmem_jax.data import splits
from resmem_jax.data.sources import clear_caches

SPLITS = ("train", "validation", "test")
DEFAULT_DATASET = "digits"
IMAGE_DATASETS = tuple(sorted(sources.SOURCES))

__all__ = ["DatasetInfo", "dataset_info", "train_batches", "eval_batches", "num_examples",
           "known_datasets", "clear_caches", "SPLITS", "DEFAULT_DATASET", "IMAGE_DATASETS"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  input_shape: tuple[int, ...]
  split_sizes: dict[str, int]


def _text_module():
  """resmem_jax.data.text when it exists (it is optional), else None."""
  try:
    return importlib.import_module("resmem_jax.data.text")
  except ModuleNotFoundError as err:
    if err.name != "resmem_jax.data.text":
      raise
    return None


def _text_datasets() -> tuple[str, ...]:
  text = _text_module()
  return tuple(getattr(text, "TEXT_DATASETS", ())) if text else ()


def known_datasets() -> tuple[str, ...]:
  return IMAGE_DATASETS + tuple(sorted(_text_datasets()))


def _name(data_cfg: Any) -> str:
  name = sources.config_value(data_cfg, "name", DEFAULT_DATASET)
  if name in sources.SOURCES or name in _text_datasets():
    return name
  raise ValueError(f"data.name={name!r} is not a known data set; known: {list(known_datasets())}")


def _is_text(name: str) -> bool:
  return name not in sources.SOURCES


def _split_seed(data_cfg: Any) -> int:
  return int(sources.config_value(data_cfg, "split_seed", 0))


def _views(data_cfg: Any, name: str) -> dict[str, sources.SplitView]:
  return sources.split_views(
      name,
      sources.config_value(data_cfg, "data_dir", None),
      sources.config_value(data_cfg, "manual_dir", None),
      float(sources.config_value(data_cfg, "val_fraction", 0.0)),
      float(sources.config_value(data_cfg, "train_fraction", 1.0)),
      _split_seed(data_cfg))


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be one of {SPLITS}")


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def _check_batch_size(global_batch_size: Any) -> int:
  if isinstance(global_batch_size, bool) or int(global_batch_size) != global_batch_size \
      or global_batch_size < 1:
    raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
  return int(global_batch_size)


def dataset_info(data_cfg: Any) -> DatasetInfo:
  """Name, class count, input shape and sizes of "train" / "validation" / "test"."""
  name = _name(data_cfg)
  if _is_text(name):
    return _text_module().dataset_info(data_cfg)
  source_spec = sources.spec(name)
  if source_spec.in_memory:
    sizes = {split: len(view) for split, view in _views(data_cfg, name).items()}
    shape = source_spec.input_shape
  else:
    from resmem_jax.data import imagenet
    stream = imagenet.ImageNetSource(data_cfg)
    sizes = dict(stream.sizes)
    shape = (stream.image_size, stream.image_size, 3)
  return DatasetInfo(name, source_spec.num_classes, tuple(shape), sizes)


def num_examples(data_cfg: Any, split: str) -> int:
  name = _name(data_cfg)
  if _is_text(name):
    return _text_module().num_examples(data_cfg, split)
  _check_split(split)
  return dataset_info(data_cfg).split_sizes[split]


def train_batches(data_cfg: Any, global_batch_size: int, seed: int, start_step: int = 0, *,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches (this process's slice), deterministic in ``(seed, start_step)``.

  ``process_index`` / ``process_count`` default to JAX's; tests pass them to simulate hosts.
  """
  name = _name(data_cfg)
  if _is_text(name):
    return _text_module().train_batches(data_cfg, global_batch_size, seed, start_step)
  global_batch_size = _check_batch_size(global_batch_size)
  if int(start_step) != start_step or start_step < 0:
    raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}")
  process_index, process_count = _processes(process_index, process_count)
  part = splits.process_slice(global_batch_size, process_index, process_count)
  augment = bool(sources.config_value(data_cfg, "augment", False))
  source_spec = sources.spec(name)
  if not source_spec.in_memory:
    from resmem_jax.data import imagenet
    return imagenet.ImageNetSource(data_cfg).train_batches(
        part.stop - part.start, int(seed), int(start_step), augment, process_index, process_count)
  view = _views(data_cfg, name)["train"]
  source = sources.array_source(name, sources.config_value(data_cfg, "data_dir", None),
                                sources.config_value(data_cfg, "manual_dir", None))
  if len(view) == 0:
    raise ValueError("the training split is empty; check data.val_fraction / data.train_fraction")
  return _array_train_batches(view, source, source_spec, global_batch_size, part, int(seed),
                              int(start_step), augment)


def _array_train_batches(view, source, source_spec, global_batch_size, part, seed, start_step,
                         augment):
  # Pad by an eighth of the side: 4 pixels for CIFAR's 32, as in the ResNet paper.
  pad = source_spec.input_shape[0] // 8
  step = start_step
  while True:
    positions = splits.train_batch_indices(len(view), global_batch_size, seed, step)
    rows = view.indices[positions[part]]
    images = view.images[rows]
    if augment and pad > 0:
      offsets, flips = augment_lib.sample_crop_flip(
          splits.augmentation_rng(seed, step), global_batch_size, pad, source_spec.flip)
      images = augment_lib.pad_crop_flip(images, offsets[part], flips[part], pad)
    yield {"image": augment_lib.normalise(images, source_spec.scale, source.mean, source.std),
           "label": view.labels[rows].astype(np.int32)}
    step += 1


def eval_batches(data_cfg: Any, split: str, global_batch_size: int, *,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Every example of ``split`` once, in order; the last batch padded and masked."""
  name = _name(data_cfg)
  if _is_text(name):
    return _text_module().eval_batches(data_cfg, split, global_batch_size)
  _check_split(split)
  global_batch_size = _check_batch_size(global_batch_size)
  process_index, process_count = _processes(process_index, process_count)
  splits.process_slice(global_batch_size, process_index, process_count)  # validates
  source_spec = sources.spec(name)
  if not source_spec.in_memory:
    from resmem_jax.data import imagenet
    return imagenet.ImageNetSource(data_cfg).eval_batches(split, global_batch_size,
                                                          process_index, process_count)
  view = _views(data_cfg, name)[split]
  source = sources.array_source(name, sources.config_value(data_cfg, "data_dir", None),
                                sources.config_value(data_cfg, "manual_dir", None))
  return _array_eval_batches(view, source, source_spec, global_batch_size, process_index,
                             process_count)


def _array_eval_batches(view, source, source_spec, global_batch_size, process_index,
                        process_count):
  if len(view) == 0:
    return
  for positions, mask in splits.eval_batch_indices(len(view), global_batch_size, process_index,
                                                   process_count):
    rows = view.indices[positions]
    images = augment_lib.normalise(view.images[rows], source_spec.scale, source.mean, source.std)
    images[~mask] = 0.0
    labels = np.where(mask, view.labels[rows], 0).astype(np.int32)
    yield {"image": images, "label": labels, "mask": mask}
