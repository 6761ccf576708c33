"""Token data for language modelling: tiny_shakespeare (characters), lm1b and c4 (subwords).

The same four functions as the image sources in ``resmem_jax.data`` (which routes the names in
``TEXT_DATASETS`` here), for token sequences of length ``L = data_cfg.seq_len``:

  ``dataset_info(data_cfg)``                    name, vocabulary size (``num_classes``), ``(L,)``,
                                                split sizes
  ``train_batches(data_cfg, global_batch_size, seed, start_step=0)``
                                                infinite host-local batches, reproducible from
                                                ``(seed, start_step)``
  ``eval_batches(data_cfg, split, global_batch_size)``
                                                finite host-local batches; every target token of the
                                                split appears exactly once with ``mask == 1``
  ``num_examples(data_cfg, split)``             sequences per epoch / per eval pass

Batches are dicts ``{"inputs", "targets", "mask"}`` of int32 ``[b, L]``: ``targets[:, t]`` is the
token after ``inputs[:, t]``, ``mask`` is 1 on real target tokens and 0 on padding.

Each TFDS example (a document) is one token stream. Evaluation cuts a document of n tokens into
``ceil((n - 1) / L)`` consecutive, non-overlapping windows (the last one padded), so each of its
n - 1 next-token targets is scored once. Training on tiny_shakespeare draws windows at uniformly
random offsets of the training stream; on lm1b / c4 it packs the shuffled documents into a stream.

Vocabularies. tiny_shakespeare: one id per character seen in the training split, sorted, id 0 for
characters never seen there. lm1b / c4: a TFDS ``SubwordTextEncoder`` of about
``data_cfg.vocab_size`` entries built from the first ``data_cfg.vocab_documents`` training
documents and saved under ``data_cfg.vocab_dir`` (default ``<data_dir>/resmem_vocab``) so every
process and later run reuses it; id 0 (the encoder's padding id) marks the start of a document.

data_cfg fields: ``name``, ``data_dir``, ``manual_dir`` (TFDS manual directory, e.g.
``../shared/datasets/tiny_shakespeare``), ``seq_len``, ``max_split_tokens`` (None, or keep only
the first N tokens of every split: quick runs and tests), and for subwords ``vocab_size``,
``vocab_documents``, ``vocab_dir``.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import os
from typing import Iterator

import numpy as np

TEXT_DATASETS = ("tiny_shakespeare", "lm1b", "c4")

# Which TFDS split backs each of our splits. lm1b has no validation split: its first 1% of train
# serves; c4's validation split is halved into validation and test.
_SOURCES = {
    "tiny_shakespeare": dict(tfds_name="tiny_shakespeare", vocabulary="char", streamed=False,
                             splits={"train": "train", "validation": "validation",
                                     "test": "test"}),
    "lm1b": dict(tfds_name="lm1b", vocabulary="subword", streamed=True,
                 splits={"train": "train[1%:]", "validation": "train[:1%]", "test": "test"}),
    "c4": dict(tfds_name="c4/en", vocabulary="subword", streamed=True,
               splits={"train": "train", "validation": "validation[:50%]",
                       "test": "validation[50%:]"}),
}
SPLITS = ("train", "validation", "test")
DOCUMENT_START = 0  # subword id that begins every document (the encoder reserves 0 for padding)


@dataclasses.dataclass(frozen=True)
class TextDatasetInfo:
  """Same fields as the image ``DatasetInfo``; ``num_classes`` is the vocabulary size."""
  name: str
  num_classes: int
  input_shape: tuple
  split_sizes: dict


def _get(cfg, field, default=None):
  value = cfg.get(field, default) if hasattr(cfg, "get") else getattr(cfg, field, default)
  return default if value is None else value


def _source(data_cfg) -> dict:
  name = _get(data_cfg, "name")
  if name not in _SOURCES:
    raise ValueError(f"data_cfg.name must be one of {TEXT_DATASETS}, got {name!r}")
  return _SOURCES[name]


def _seq_len(data_cfg) -> int:
  seq_len = int(_get(data_cfg, "seq_len", 128))
  if seq_len < 1:
    raise ValueError(f"data_cfg.seq_len must be >= 1, got {seq_len}")
  return seq_len


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _dirs(data_cfg):
  data_dir = _get(data_cfg, "data_dir")
  manual_dir = _get(data_cfg, "manual_dir")
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"data_cfg.manual_dir {manual_dir!r} is not a directory")
  return (None if data_dir is None else os.path.expanduser(str(data_dir)),
          None if manual_dir is None else str(manual_dir))


def _raw_documents(tfds_name: str, tfds_split: str, data_dir, manual_dir, seed=None) -> Iterator[str]:
  """Texts of a TFDS split (prepared on first use), in file order or shuffled with ``seed``."""
  import tensorflow_datasets as tfds  # heavy; only when data is read
  from resmem_jax.data import sources  # pylint: disable=g-import-not-at-top
  # The image data sets' preparation path: local archives first, a fast clear error offline.
  builder = sources.tfds_builder(tfds_name, data_dir, manual_dir)
  read_config = tfds.ReadConfig(shuffle_seed=seed) if seed is not None else None
  ds = builder.as_dataset(split=tfds_split, shuffle_files=seed is not None, read_config=read_config)
  for example in ds.as_numpy_iterator():
    text = example["text"]
    yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


@functools.lru_cache(maxsize=16)
def _in_memory_text(tfds_name, tfds_split, data_dir, manual_dir) -> tuple:
  return tuple(_raw_documents(tfds_name, tfds_split, data_dir, manual_dir))


class CharVocabulary:
  """Characters <-> ids; id 0 stands for any character absent from the vocabulary."""

  def __init__(self, characters):
    self.characters = sorted(set(characters))
    self._ids = {c: i + 1 for i, c in enumerate(self.characters)}

  @property
  def vocab_size(self) -> int:
    return len(self.characters) + 1

  def encode(self, text: str) -> np.ndarray:
    return np.fromiter((self._ids.get(c, 0) for c in text), dtype=np.int32, count=len(text))

  def decode(self, ids) -> str:
    return "".join(self.characters[i - 1] if i > 0 else "\ufffd" for i in np.asarray(ids).tolist())


class SubwordVocabulary:
  """A TFDS SubwordTextEncoder; documents are encoded as ``[DOCUMENT_START] + ids``."""

  def __init__(self, encoder):
    self.encoder = encoder

  @property
  def vocab_size(self) -> int:
    return int(self.encoder.vocab_size)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray([DOCUMENT_START] + list(self.encoder.encode(text)), dtype=np.int32)

  def decode(self, ids) -> str:
    return self.encoder.decode([i for i in np.asarray(ids).tolist() if i != DOCUMENT_START])


@functools.lru_cache(maxsize=8)
def _vocabulary_cached(name, data_dir, manual_dir, vocab_size, vocab_documents, vocab_dir):
  source = _SOURCES[name]
  if source["vocabulary"] == "char":
    texts = _in_memory_text(source["tfds_name"], source["splits"]["train"], data_dir, manual_dir)
    return CharVocabulary("".join(texts))
  import tensorflow_datasets as tfds
  subword = tfds.deprecated.text.SubwordTextEncoder
  prefix = os.path.join(vocab_dir, f"{name}_subwords{vocab_size}_{vocab_documents}docs")
  if os.path.exists(prefix + ".subwords"):
    return SubwordVocabulary(subword.load_from_file(prefix))
  texts = _raw_documents(source["tfds_name"], source["splits"]["train"], data_dir, manual_dir)
  corpus = (text for _, text in zip(range(vocab_documents), texts))
  encoder = subword.build_from_corpus(corpus, target_vocab_size=vocab_size)
  os.makedirs(vocab_dir, exist_ok=True)
  encoder.save_to_file(prefix)
  return SubwordVocabulary(encoder)


def vocabulary(data_cfg):
  """The token vocabulary of ``data_cfg`` (``.encode``, ``.decode``, ``.vocab_size``)."""
  source = _source(data_cfg)
  data_dir, manual_dir = _dirs(data_cfg)
  vocab_size = int(_get(data_cfg, "vocab_size", 8192))
  vocab_documents = int(_get(data_cfg, "vocab_documents", 10000))
  if source["vocabulary"] == "subword" and (vocab_size < 256 or vocab_documents < 1):
    raise ValueError(f"data_cfg.vocab_size must be >= 256 and data_cfg.vocab_documents >= 1, got "
                     f"{vocab_size} and {vocab_documents}")
  vocab_dir = _get(data_cfg, "vocab_dir") or os.path.join(
      data_dir or os.path.expanduser("~/tensorflow_datasets"), "resmem_vocab")
  return _vocabulary_cached(_get(data_cfg, "name"), data_dir, manual_dir, vocab_size,
                            vocab_documents, str(vocab_dir))


def _documents(data_cfg, split: str, seed=None) -> Iterator[np.ndarray]:
  """Token arrays, one per document of ``split``."""
  _check_split(split)
  source = _source(data_cfg)
  data_dir, manual_dir = _dirs(data_cfg)
  vocab = vocabulary(data_cfg)
  if source["streamed"]:
    texts = _raw_documents(source["tfds_name"], source["splits"][split], data_dir, manual_dir, seed)
  else:
    texts = _in_memory_text(source["tfds_name"], source["splits"][split], data_dir, manual_dir)
  budget = _get(data_cfg, "max_split_tokens")
  if budget is not None and int(budget) < 2:
    raise ValueError(f"data_cfg.max_split_tokens must be >= 2 or None, got {budget}")
  for text in texts:
    tokens = vocab.encode(text)
    if budget is not None:
      tokens, budget = tokens[:int(budget)], int(budget) - len(tokens[:int(budget)])
    if len(tokens):
      yield tokens
    if budget is not None and budget <= 0:
      return


@functools.lru_cache(maxsize=8)
def _in_memory_stream(name, data_dir, manual_dir, split, max_split_tokens) -> np.ndarray:
  cfg = {"name": name, "data_dir": data_dir, "manual_dir": manual_dir,
         "max_split_tokens": max_split_tokens}
  return np.concatenate(list(_documents(cfg, split)))


def _windows_per_document(num_tokens: int, seq_len: int) -> int:
  return math.ceil(max(num_tokens - 1, 0) / seq_len)


def num_examples(data_cfg, split: str) -> int:
  """Length-L sequences in one evaluation pass over ``split`` (= one training epoch for train)."""
  seq_len = _seq_len(data_cfg)
  return sum(_windows_per_document(len(d), seq_len) for d in _documents(data_cfg, split))


class _LazySplitSizes(collections.abc.Mapping):
  """split -> sequences per pass, each counted (a tokenizing pass) only when first asked for.

  Counting lm1b's or C4's training split means reading all of it, so nothing counts a split
  that the caller never looks at (training with ``num_steps`` never needs the train size).
  """

  def __init__(self, data_cfg):
    self._cfg = data_cfg
    self._sizes = {}

  def __getitem__(self, split):
    if split not in SPLITS:
      raise KeyError(split)
    if split not in self._sizes:
      self._sizes[split] = num_examples(self._cfg, split)
    return self._sizes[split]

  def __iter__(self):
    return iter(SPLITS)

  def __len__(self):
    return len(SPLITS)


def dataset_info(data_cfg) -> TextDatasetInfo:
  return TextDatasetInfo(
      name=_get(data_cfg, "name"), num_classes=vocabulary(data_cfg).vocab_size,
      input_shape=(_seq_len(data_cfg),), split_sizes=_LazySplitSizes(data_cfg))


def _host_rows(global_batch_size: int):
  """This process's row range of a global batch (processes feed consecutive slices)."""
  import jax
  count, index = jax.process_count(), jax.process_index()
  if global_batch_size < 1 or global_batch_size % count:
    raise ValueError(f"global_batch_size ({global_batch_size}) must be a positive multiple of the "
                     f"{count} processes")
  local = global_batch_size // count
  return slice(index * local, (index + 1) * local)


def _eval_windows(documents, seq_len: int):
  """(inputs, targets, mask) windows of length ``seq_len`` covering every target once."""
  for tokens in documents:
    for start in range(0, len(tokens) - 1, seq_len):
      piece = tokens[start:start + seq_len + 1]
      n = len(piece) - 1
      inputs = np.zeros(seq_len, np.int32)
      targets = np.zeros(seq_len, np.int32)
      mask = np.zeros(seq_len, np.int32)
      inputs[:n], targets[:n], mask[:n] = piece[:-1], piece[1:], 1
      yield inputs, targets, mask


def _stack(rows, global_batch_size: int, seq_len: int, host_rows: slice) -> dict:
  batch = {key: np.zeros((global_batch_size, seq_len), np.int32)
           for key in ("inputs", "targets", "mask")}
  for i, (inputs, targets, mask) in enumerate(rows):
    batch["inputs"][i], batch["targets"][i], batch["mask"][i] = inputs, targets, mask
  return {key: value[host_rows] for key, value in batch.items()}


def eval_batches(data_cfg, split: str, global_batch_size: int) -> Iterator[dict]:
  """Finite host-local batches over ``split``; padding rows and positions have ``mask == 0``."""
  seq_len = _seq_len(data_cfg)
  host_rows = _host_rows(global_batch_size)
  rows = []
  for window in _eval_windows(_documents(data_cfg, split), seq_len):
    rows.append(window)
    if len(rows) == global_batch_size:
      yield _stack(rows, global_batch_size, seq_len, host_rows)
      rows = []
  if rows:
    yield _stack(rows, global_batch_size, seq_len, host_rows)


def _packed_windows(data_cfg, seed: int, seq_len: int) -> Iterator[np.ndarray]:
  """Length L+1 windows of the shuffled training documents joined end to end, epoch after epoch."""
  epoch = 0
  while True:
    buffer = np.zeros(0, np.int32)
    for tokens in _documents(data_cfg, "train", seed=seed * 1_000_003 + epoch):
      buffer = np.concatenate([buffer, tokens])
      while len(buffer) >= seq_len + 1:
        yield buffer[:seq_len + 1]
        buffer = buffer[seq_len:]  # the last target is the next window's first input
    epoch += 1


def train_batches(data_cfg, global_batch_size: int, seed: int, start_step: int = 0) -> Iterator[dict]:
  """Infinite host-local training batches; batch ``s`` depends only on ``(seed, s)``.

  tiny_shakespeare: windows at uniformly random offsets drawn from ``default_rng((seed, s))``.
  lm1b / c4: packed windows of the TFDS-shuffled documents; resuming skips ``start_step``
  batches' worth of windows, so it sees the same batches an uninterrupted run would.
  """
  seq_len = _seq_len(data_cfg)
  host_rows = _host_rows(global_batch_size)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  source = _source(data_cfg)
  ones = np.ones((global_batch_size, seq_len), np.int32)[host_rows]
  if not source["streamed"]:
    data_dir, manual_dir = _dirs(data_cfg)
    stream = _in_memory_stream(_get(data_cfg, "name"), data_dir, manual_dir, "train",
                               _get(data_cfg, "max_split_tokens"))
    if len(stream) < seq_len + 1:
      raise ValueError(f"training split has {len(stream)} tokens, fewer than seq_len + 1")
    step = start_step
    while True:
      rng = np.random.default_rng((seed, step))
      starts = rng.integers(0, len(stream) - seq_len, size=global_batch_size)[host_rows]
      windows = stream[starts[:, None] + np.arange(seq_len + 1)[None, :]]
      yield {"inputs": windows[:, :-1], "targets": windows[:, 1:], "mask": ones}
      step += 1
  windows = _packed_windows(data_cfg, seed, seq_len)
  for _ in range(start_step * global_batch_size):
    next(windows)
  while True:
    block = np.stack([next(windows) for _ in range(global_batch_size)])[host_rows]
    yield {"inputs": block[:, :-1], "targets": block[:, 1:], "mask": ones}
