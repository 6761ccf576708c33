"""resmem_jax.data's text sets: token batches, resume, processes, lazily counted split sizes.

Tests on the real tiny_shakespeare archive skip when ../shared/datasets is absent; the others use
tfds.testing.mock_data.
"""
import importlib

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from conftest import shared_dataset_dir  # noqa: E402
from resmem_jax import data  # noqa: E402
from resmem_jax import settings as settings_lib  # noqa: E402
from resmem_jax.data import text  # noqa: E402
from resmem_jax.settings import DataSettings  # noqa: E402

ONE_PROCESS = dict(process_index=0, process_count=1)


def shakespeare(tmp_path, **overrides) -> text.TextDataset:
  manual = shared_dataset_dir("tiny_shakespeare")
  fields = dict(name="tiny_shakespeare", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual),
                seq_len=16, max_split_tokens=3000)
  fields.update(overrides)
  return data.get_dataset(DataSettings(**fields))


def test_text_batches_cover_every_target_once_and_resume(tmp_path):
  dataset = shakespeare(tmp_path)
  info = dataset.info
  assert info.num_classes == 66 and info.input_shape == (16,) and info.input_dtype == "int32"
  stream = np.concatenate(list(dataset.documents("test")))
  assert len(stream) == 3000
  batches = list(dataset.eval_batches("test", 24, **ONE_PROCESS))
  assert all(set(b) == {"inputs", "labels", "mask"} for b in batches)
  assert all(b["mask"].dtype == bool and b["mask"].shape == b["labels"].shape == (24, 16)
             for b in batches)
  labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
  inputs = np.concatenate([b["inputs"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, stream[1:])
  np.testing.assert_array_equal(inputs, stream[:-1])
  assert sum(len(b["mask"]) for b in batches) >= info.split_sizes["test"] == -(-2999 // 16)
  assert dataset.num_examples("test") == -(-2999 // 16)
  fresh = dataset.train_batches(4, seed=3, **ONE_PROCESS)
  first = [next(fresh) for _ in range(3)]
  resumed = next(dataset.train_batches(4, seed=3, start_step=2, **ONE_PROCESS))
  for key in ("inputs", "labels", "mask"):
    np.testing.assert_array_equal(resumed[key], first[2][key])
  np.testing.assert_array_equal(first[0]["inputs"][:, 1:], first[0]["labels"][:, :-1])
  assert first[0]["inputs"].dtype == np.int32 and first[0]["mask"].all()
  assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
  with pytest.raises(ValueError, match="split"):
    dataset.eval_batches("dev", 4, **ONE_PROCESS)


def test_vocabulary_round_trips_and_is_kept(tmp_path):
  dataset = shakespeare(tmp_path)
  vocabulary = dataset.vocabulary
  assert vocabulary is dataset.vocabulary and vocabulary.vocab_size == dataset.info.num_classes
  line = "ROMEO: But soft!"
  assert vocabulary.decode(vocabulary.encode(line)) == line


@pytest.mark.parametrize("config_module", ["lm1b", "c4"])
def test_subword_datasets_on_mock_data(tmp_path, config_module):
  config = importlib.import_module(f"resmem_jax.configs.{config_module}").get_config("tiny")
  config.data.data_dir = str(tmp_path / "tfds")
  dataset = data.get_dataset(settings_lib.from_config(config).data)
  with tfds.testing.mock_data(num_examples=12):
    info = dataset.info
    assert info.name == config_module and 256 <= info.num_classes <= 400
    assert list((tmp_path / "tfds" / "resmem_vocab").glob("*.subwords"))  # saved for reuse
    docs = list(dataset.documents("test"))
    assert all(d[0] == text.DOCUMENT_START for d in docs)
    batches = list(dataset.eval_batches("test", 8, **ONE_PROCESS))
    labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, np.concatenate([d[1:] for d in docs]))
    first = next(dataset.train_batches(4, seed=1, **ONE_PROCESS))
    stream = dataset.train_batches(4, seed=1, **ONE_PROCESS)
    batches3 = [next(stream) for _ in range(3)]
    np.testing.assert_array_equal(batches3[0]["inputs"], first["inputs"])
    resumed = next(dataset.train_batches(4, seed=1, start_step=2, **ONE_PROCESS))
    np.testing.assert_array_equal(resumed["labels"], batches3[2]["labels"])
    assert resumed["inputs"].shape == (4, 16) and resumed["inputs"].dtype == np.int32
    # A second data set object loads the saved vocabulary instead of building it again.
    again = data.get_dataset(settings_lib.from_config(config).data)
    assert again.vocabulary.encoder.subwords == dataset.vocabulary.encoder.subwords


def test_text_split_sizes_are_counted_lazily(monkeypatch):
  dataset = data.get_dataset(DataSettings(name="tiny_shakespeare", seq_len=8))
  counted = []
  monkeypatch.setattr(dataset, "count_sequences", lambda split: counted.append(split) or 3)
  # As if the vocabulary had been built (a cached property: looking it up would read the data).
  monkeypatch.setitem(vars(dataset), "vocabulary", text.CharVocabulary("ab"))
  info = dataset.info
  assert info.num_classes == 3
  assert counted == []  # nothing read yet
  assert info.split_sizes["validation"] == 3 and dataset.num_examples("validation") == 3
  assert counted == ["validation"]  # counted once, only the split asked for
  assert dict(info.split_sizes) == {s: 3 for s in data.SPLITS}


def test_processes_get_their_rows_of_every_text_batch(tmp_path):
  with tfds.testing.mock_data(num_examples=3):
    dataset = data.get_dataset(DataSettings(name="tiny_shakespeare", data_dir=str(tmp_path),
                                            seq_len=8))
    whole = list(dataset.eval_batches("test", 4, **ONE_PROCESS))
    parts = [list(dataset.eval_batches("test", 4, process_index=p, process_count=2))
             for p in range(2)]
    train_whole = next(dataset.train_batches(4, 5, 2, **ONE_PROCESS))
    train_parts = [next(dataset.train_batches(4, 5, 2, process_index=p, process_count=2))
                   for p in range(2)]
    with pytest.raises(ValueError, match="multiple of the process count"):
      dataset.eval_batches("test", 5, process_index=0, process_count=2)
  assert len(parts[0]) == len(parts[1]) == len(whole)
  assert sum(int(b["mask"].any(axis=1).sum()) for b in whole) == dataset.num_examples("test")
  for key in ("inputs", "labels", "mask"):
    for batch, first, second in zip(whole, *parts):
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])
    np.testing.assert_array_equal(np.concatenate([p[key] for p in train_parts]), train_whole[key])
  last = whole[-1]
  assert not last["inputs"][~last["mask"]].any() and not last["labels"][~last["mask"]].any()


def test_short_training_split_is_refused(tmp_path):
  with tfds.testing.mock_data(num_examples=1):
    dataset = data.get_dataset(DataSettings(name="tiny_shakespeare", data_dir=str(tmp_path),
                                            seq_len=64, max_split_tokens=10))
    with pytest.raises(ValueError, match=r"10 tokens, fewer than data.seq_len \+ 1 = 65"):
      dataset.train_batches(4, 0, **ONE_PROCESS)
