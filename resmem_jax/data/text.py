"""Token data for language modelling: tiny_shakespeare (characters), lm1b and c4 (subwords).

:class:`TextDataset` serves the names in :data:`TEXT_SOURCES` behind the common interface
(``resmem_jax.data.base``) for token sequences of length ``L = data.seq_len``: ``inputs`` and
``labels`` int32 ``[b, L]`` where ``labels[:, t]`` is the token after ``inputs[:, t]``, and
``mask`` bool ``[b, L]``, True on real target tokens. ``info.num_classes`` is the vocabulary size.

Each TFDS example (a document) is one token stream. Evaluation cuts a document of n tokens into
``ceil((n - 1) / L)`` consecutive, non-overlapping windows (the last one padded), so each of its
n - 1 next-token targets is scored once; ``info.split_sizes`` counts these windows, each split only
when first asked for (counting lm1b's or C4's training split means reading all of it). Training on
tiny_shakespeare draws windows at uniformly random offsets of the training stream from
``(seed, step)``; on lm1b / c4 it packs the TFDS-shuffled documents into a stream and a resumed run
skips ``start_step`` batches' worth of windows, so it sees the batches an uninterrupted run would.

Vocabularies. tiny_shakespeare: one id per character seen in the training split, sorted, id 0 for
characters never seen there. lm1b / c4: a TFDS ``SubwordTextEncoder`` of about ``data.vocab_size``
entries built from the first ``data.vocab_documents`` training documents and saved under
``data.vocab_dir`` (default ``<data_dir>/resmem_vocab``) so every process and later run reuses it;
id 0 (the encoder's padding id) marks the start of a document. ``data.max_split_tokens`` (None, or
keep only the first N tokens of every split) makes quick runs and tests.

A :class:`TextDataset` reads tiny_shakespeare's texts, the training token stream and the
vocabulary once and keeps them; lm1b and c4 are streamed from TFDS on every pass.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import os
from typing import Callable, Iterator

import numpy as np

from resmem_jax.data import base
from resmem_jax.data import tfds_prepare
from resmem_jax.settings import DataSettings

DOCUMENT_START = 0  # subword id that begins every document (the encoder reserves 0 for padding)


@dataclasses.dataclass(frozen=True)
class TextSource:
  tfds_name: str
  vocabulary: str  # "char" | "subword"
  streamed: bool  # read from TFDS on every pass (else held in memory)
  splits: dict  # our split -> TFDS split


# lm1b has no validation split: its first 1% of train serves; c4's validation split is halved
# into validation and test.
TEXT_SOURCES = {
    "tiny_shakespeare": TextSource("tiny_shakespeare", "char", False,
                                   {"train": "train", "validation": "validation", "test": "test"}),
    "lm1b": TextSource("lm1b", "subword", True,
                       {"train": "train[1%:]", "validation": "train[:1%]", "test": "test"}),
    "c4": TextSource("c4/en", "subword", True,
                     {"train": "train", "validation": "validation[:50%]",
                      "test": "validation[50%:]"}),
}


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


class LazySplitSizes(collections.abc.Mapping):
  """split -> sequences per pass, each counted by ``count`` only when first asked for.

  Training with ``num_steps`` never needs the (expensive) size of the training split.
  """

  def __init__(self, count: Callable[[str], int]):
    self._count = count
    self._sizes: dict[str, int] = {}

  def __getitem__(self, split):
    if split not in base.SPLITS:
      raise KeyError(split)
    if split not in self._sizes:
      self._sizes[split] = self._count(split)
    return self._sizes[split]

  def __iter__(self):
    return iter(base.SPLITS)

  def __len__(self):
    return len(base.SPLITS)


def windows_per_document(num_tokens: int, seq_len: int) -> int:
  return math.ceil(max(num_tokens - 1, 0) / seq_len)


def _eval_windows(documents, seq_len: int):
  """(inputs, labels, mask) windows of length ``seq_len`` covering every target once."""
  for tokens in documents:
    for start in range(0, len(tokens) - 1, seq_len):
      piece = tokens[start:start + seq_len + 1]
      n = len(piece) - 1
      inputs = np.zeros(seq_len, np.int32)
      labels = np.zeros(seq_len, np.int32)
      mask = np.zeros(seq_len, bool)
      inputs[:n], labels[:n], mask[:n] = piece[:-1], piece[1:], True
      yield inputs, labels, mask


def _stack(rows, global_batch_size: int, seq_len: int, part: slice) -> dict[str, np.ndarray]:
  """This process's part of a global batch built from ``rows`` (zeros / False beyond them)."""
  batch = {"inputs": np.zeros((global_batch_size, seq_len), np.int32),
           "labels": np.zeros((global_batch_size, seq_len), np.int32),
           "mask": np.zeros((global_batch_size, seq_len), bool)}
  for i, (inputs, labels, mask) in enumerate(rows):
    batch["inputs"][i], batch["labels"][i], batch["mask"][i] = inputs, labels, mask
  return {key: value[part] for key, value in batch.items()}


class TextDataset(base.Dataset):
  """tiny_shakespeare, lm1b or c4 (``data.name``); see the module docstring."""

  def __init__(self, settings: DataSettings):
    super().__init__(settings)
    if settings.name not in TEXT_SOURCES:
      raise ValueError(f"data.name={settings.name!r} is not a text data set; text data sets: "
                       f"{', '.join(TEXT_SOURCES)}")
    self.source = TEXT_SOURCES[settings.name]
    # Held-in-memory sources: TFDS split -> documents, read once.
    self._texts: dict[str, tuple[str, ...]] = {}

  @property
  def seq_len(self) -> int:
    return self.settings.seq_len

  def _dirs(self) -> tuple[str | None, str | None]:
    data_dir, manual_dir = self.settings.data_dir, self.settings.manual_dir
    if manual_dir is not None and not os.path.isdir(manual_dir):
      raise tfds_prepare.DataUnavailable(
          f"data.manual_dir {manual_dir!r} is not a directory: pass an existing folder holding "
          f"{self.source.tfds_name}'s archives as --config.data.manual_dir=/path/to/folder")
    return (None if data_dir is None else os.path.expanduser(data_dir), manual_dir)

  def _raw_documents(self, tfds_split: str, seed: int | None = None) -> Iterator[str]:
    """Texts of a TFDS split (prepared on first use), in file order or shuffled with ``seed``."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir, manual_dir = self._dirs()
    builder = tfds_prepare.tfds_builder(self.source.tfds_name, data_dir, manual_dir)
    read_config = tfds.ReadConfig(shuffle_seed=seed) if seed is not None else None
    dataset = builder.as_dataset(split=tfds_split, shuffle_files=seed is not None,
                                 read_config=read_config)
    for example in dataset.as_numpy_iterator():
      text = example["text"]
      yield text.decode("utf-8") if isinstance(text, bytes) else str(text)

  def _texts_of(self, tfds_split: str, seed: int | None = None):
    if self.source.streamed:
      return self._raw_documents(tfds_split, seed)
    if tfds_split not in self._texts:
      self._texts[tfds_split] = tuple(self._raw_documents(tfds_split))
    return self._texts[tfds_split]

  @functools.cached_property
  def vocabulary(self):
    """The token vocabulary (``.encode``, ``.decode``, ``.vocab_size``), built or loaded once."""
    train_split = self.source.splits["train"]
    if self.source.vocabulary == "char":
      return CharVocabulary("".join(self._texts_of(train_split)))
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    s = self.settings
    subword = tfds.deprecated.text.SubwordTextEncoder
    data_dir, _ = self._dirs()
    vocab_dir = s.vocab_dir or os.path.join(
        data_dir or os.path.expanduser("~/tensorflow_datasets"), "resmem_vocab")
    prefix = os.path.join(vocab_dir, f"{s.name}_subwords{s.vocab_size}_{s.vocab_documents}docs")
    if os.path.exists(prefix + ".subwords"):
      return SubwordVocabulary(subword.load_from_file(prefix))
    # The first vocab_documents documents (strict=False: the split may hold fewer, or many more).
    documents = self._raw_documents(train_split)
    corpus = (text for _, text in zip(range(s.vocab_documents), documents, strict=False))
    encoder = subword.build_from_corpus(corpus, target_vocab_size=s.vocab_size)
    os.makedirs(vocab_dir, exist_ok=True)
    encoder.save_to_file(prefix)
    return SubwordVocabulary(encoder)

  def documents(self, split: str, seed: int | None = None) -> Iterator[np.ndarray]:
    """Token arrays, one per document of ``split`` (TFDS-shuffled with ``seed`` when streamed)."""
    base.check_split(split)
    vocab = self.vocabulary
    budget = self.settings.max_split_tokens
    for text in self._texts_of(self.source.splits[split], seed):
      tokens = vocab.encode(text)
      if budget is not None:
        tokens = tokens[:budget]
        budget -= len(tokens)
      if len(tokens):
        yield tokens
      if budget is not None and budget <= 0:
        return

  @functools.cached_property
  def train_stream(self) -> np.ndarray:
    """The whole training split as one token array (held-in-memory sources)."""
    return np.concatenate(list(self.documents("train")))

  def count_sequences(self, split: str) -> int:
    """Length-L sequences in one evaluation pass over ``split`` (reads the whole split)."""
    return sum(windows_per_document(len(d), self.seq_len) for d in self.documents(split))

  @functools.cached_property
  def info(self) -> base.DatasetInfo:
    return base.DatasetInfo(
        name=self.settings.name, num_classes=self.vocabulary.vocab_size,
        input_shape=(self.seq_len,), input_dtype="int32",
        split_sizes=LazySplitSizes(self.count_sequences))

  def _eval_batches(self, split, global_batch_size, part, process_index,
                    process_count) -> Iterator[dict[str, np.ndarray]]:
    # Every process reads the whole split and keeps its rows of each global batch.
    rows = []
    for window in _eval_windows(self.documents(split), self.seq_len):
      rows.append(window)
      if len(rows) == global_batch_size:
        yield _stack(rows, global_batch_size, self.seq_len, part)
        rows = []
    if rows:
      yield _stack(rows, global_batch_size, self.seq_len, part)

  def _train_batches(self, global_batch_size, seed, start_step, part, process_index,
                     process_count) -> Iterator[dict[str, np.ndarray]]:
    if self.source.streamed:
      return self._packed_batches(global_batch_size, seed, start_step, part)
    stream = self.train_stream
    if len(stream) < self.seq_len + 1:
      raise ValueError(f"the training split has {len(stream)} tokens, fewer than data.seq_len + 1 "
                       f"= {self.seq_len + 1}")
    return self._random_window_batches(stream, global_batch_size, seed, start_step, part)

  def _random_window_batches(self, stream, global_batch_size, seed, start_step, part):
    seq_len = self.seq_len
    mask = np.ones((global_batch_size, seq_len), bool)[part]
    step = start_step
    while True:
      rng = np.random.default_rng((seed, step))
      starts = rng.integers(0, len(stream) - seq_len, size=global_batch_size)[part]
      windows = stream[starts[:, None] + np.arange(seq_len + 1)[None, :]]
      yield {"inputs": windows[:, :-1], "labels": windows[:, 1:], "mask": mask}
      step += 1

  def _packed_windows(self, seed: int) -> Iterator[np.ndarray]:
    """Length L+1 windows of the shuffled training documents joined end to end, epoch by epoch."""
    seq_len = self.seq_len
    epoch = 0
    while True:
      buffer = np.zeros(0, np.int32)
      produced = False
      for tokens in self.documents("train", seed=seed * 1_000_003 + epoch):
        buffer = np.concatenate([buffer, tokens])
        while len(buffer) >= seq_len + 1:
          yield buffer[:seq_len + 1]
          produced = True
          buffer = buffer[seq_len:]  # the last target is the next window's first input
      if not produced:  # else the next epoch would loop forever, yielding nothing
        raise ValueError(f"the training split has fewer than data.seq_len + 1 = {seq_len + 1} "
                         f"tokens")
      epoch += 1

  def _packed_batches(self, global_batch_size, seed, start_step, part):
    mask = np.ones((global_batch_size, self.seq_len), bool)[part]
    windows = self._packed_windows(seed)
    for _ in range(start_step * global_batch_size):
      next(windows)
    while True:
      block = np.stack([next(windows) for _ in range(global_batch_size)])[part]
      yield {"inputs": block[:, :-1], "labels": block[:, 1:], "mask": mask}
