"""Tests for resmem_jax.data on the embedded digits and the pure split / batch / augment helpers."""
import numpy as np
import pytest

from resmem_jax import data
from resmem_jax import settings as settings_lib
from resmem_jax.data import augment, digits, splits
from resmem_jax.settings import DataSettings


def digits_data(**overrides) -> data.Dataset:
  fields = dict(name="digits", val_fraction=0.1)
  fields.update(overrides)
  return data.get_dataset(DataSettings(**fields))


def test_digits_source_is_real_and_split_deterministically():
  from sklearn.datasets import load_digits
  info = digits_data(val_fraction=0.0).info
  assert info.name == "digits" and info.num_classes == 10 and info.input_shape == (8, 8, 1)
  assert info.input_dtype == "float32"
  assert info.split_sizes == {"train": 1797 - 360, "validation": 0, "test": 360}
  train_x, train_y, test_x, test_y = digits.load_digits()
  again = digits.load_digits()
  np.testing.assert_array_equal(test_x, again[2])
  # Train and test together are exactly scikit-learn's 1797 images, each once.
  everything = np.concatenate([train_x, test_x]).reshape(1797, -1)
  reference = load_digits().images.astype(np.uint8).reshape(1797, -1)
  labels = np.concatenate([train_y, test_y])
  order_ours = np.lexsort(np.c_[everything, labels].T)
  order_ref = np.lexsort(np.c_[reference, load_digits().target].T)
  np.testing.assert_array_equal(everything[order_ours], reference[order_ref])
  np.testing.assert_array_equal(labels[order_ours], load_digits().target[order_ref])


def test_registry_names_and_lookup():
  assert data.known_datasets() == ("digits", "imagenet2012", "tiny_shakespeare", "lm1b", "c4")
  for name in data.known_datasets():
    data.check_name(name)  # built-ins need no TFDS lookup
    dataset = data.get_dataset(DataSettings(name=name))
    assert isinstance(dataset, data.Dataset) and dataset.settings.name == name
  assert type(data.get_dataset(DataSettings(name="lm1b"))).__name__ == "TextDataset"


def test_a_dataset_loads_once_and_instances_share_nothing(monkeypatch):
  loads = []
  real = digits.load_digits
  monkeypatch.setattr(digits, "load_digits", lambda: loads.append(1) or real())
  first = digits_data()
  assert loads == []  # creating a data set reads nothing
  first.info, first.num_examples("test")
  list(first.eval_batches("test", 100, process_index=0, process_count=1))
  next(first.train_batches(32, 0, process_index=0, process_count=1))
  assert len(loads) == 1 and first.arrays is first.arrays
  second = digits_data(val_fraction=0.5)
  assert second.info.split_sizes["validation"] == round(0.5 * 1437)
  assert len(loads) == 2  # no module-level cache between instances
  assert first.info.split_sizes["validation"] == round(0.1 * 1437)


def test_validation_carving_is_deterministic_disjoint_and_complete():
  train, val = splits.carve_validation(1000, 0.15)
  train2, val2 = splits.carve_validation(1000, 0.15)
  np.testing.assert_array_equal(train, train2)
  np.testing.assert_array_equal(val, val2)
  assert len(val) == 150 and len(train) == 850
  assert not set(train) & set(val)
  assert sorted(set(train) | set(val)) == list(range(1000))
  other_train, _ = splits.carve_validation(1000, 0.15, split_seed=1)
  assert not np.array_equal(train, other_train)
  with pytest.raises(ValueError, match="val_fraction"):
    splits.carve_validation(10, 1.0)


def test_public_splits_do_not_overlap():
  dataset = digits_data(val_fraction=0.2)
  rows = dataset.split_indices
  assert not set(rows["train"]) & set(rows["validation"])
  assert len(rows["train"]) + len(rows["validation"]) == 1437
  assert dataset.num_examples("validation") == round(0.2 * 1437)
  batches = dataset.eval_batches("validation", 64, process_index=0, process_count=1)
  labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, dataset.arrays.train_labels[rows["validation"]])


def test_train_fraction_is_nested_deterministic_and_inside_train():
  full = digits_data().split_indices["train"]
  half = digits_data(train_fraction=0.5).split_indices["train"]
  tenth = digits_data(train_fraction=0.1).split_indices["train"]
  assert len(half) == round(0.5 * len(full)) and len(tenth) == round(0.1 * len(full))
  assert set(tenth) <= set(half) <= set(full)
  np.testing.assert_array_equal(half, splits.subsample(full, 0.5))
  assert digits_data(train_fraction=0.5).num_examples("train") == len(half)
  # The validation split does not depend on the training fraction.
  np.testing.assert_array_equal(digits_data(train_fraction=0.5).split_indices["validation"],
                                digits_data().split_indices["validation"])
  with pytest.raises(ValueError, match="train_fraction"):
    splits.subsample(full, 0.0)


def test_training_stream_covers_each_epoch_once():
  n, batch = 23, 5
  order = splits.TrainOrder(n, batch, seed=7)
  stream = np.concatenate([order.batch(s) for s in range(n * 3)])
  for epoch in range(3 * batch):  # n*3 steps of 5 = 15 epochs of 23
    np.testing.assert_array_equal(np.sort(stream[epoch * n:(epoch + 1) * n]), np.arange(n))
  assert not np.array_equal(stream[:n], stream[n:2 * n])  # fresh permutation per epoch
  # Any step directly (the permutation kept is not stale) and in any order.
  np.testing.assert_array_equal(splits.TrainOrder(n, batch, seed=7).batch(40), stream[200:205])
  np.testing.assert_array_equal(order.batch(2), stream[10:15])
  with pytest.raises(ValueError, match="training split is empty"):
    splits.TrainOrder(0, batch, seed=7)


def test_train_batches_resume_exactly_and_depend_on_seed():
  dataset = digits_data(augment=True)
  stream = dataset.train_batches(64, seed=3, process_index=0, process_count=1)
  first = [next(stream) for _ in range(25)]  # crosses the epoch boundary (1293 / 64)
  for start in (0, 7, 20, 24):
    resumed = next(dataset.train_batches(64, seed=3, start_step=start, process_index=0,
                                         process_count=1))
    np.testing.assert_array_equal(resumed["inputs"], first[start]["inputs"])
    np.testing.assert_array_equal(resumed["labels"], first[start]["labels"])
  other = next(dataset.train_batches(64, seed=4, process_index=0, process_count=1))
  assert not np.array_equal(other["labels"], first[0]["labels"])
  assert set(first[0]) == {"inputs", "labels"}
  assert first[0]["inputs"].dtype == np.float32 and first[0]["labels"].dtype == np.int32
  assert first[0]["inputs"].shape == (64, 8, 8, 1) and first[0]["labels"].shape == (64,)


@pytest.mark.parametrize("num_examples,batch,processes", [(37, 8, 1), (37, 9, 3), (5, 16, 2),
                                                          (48, 12, 4)])
def test_eval_index_batches_cover_each_example_once(num_examples, batch, processes):
  seen = []
  counts = set()
  for process in range(processes):
    batches = list(splits.eval_batch_indices(num_examples, batch, process, processes))
    counts.add(len(batches))
    for indices, mask in batches:
      assert len(indices) == batch // processes
      seen.extend(indices[mask])
  assert len(counts) == 1  # all processes step together
  assert sorted(seen) == list(range(num_examples))


def test_eval_batches_yield_every_test_example_once_with_padding():
  dataset = digits_data()
  batches = list(dataset.eval_batches("test", 49, process_index=0, process_count=1))
  assert len(batches) == 8  # 360 = 7 * 49 + 17
  assert all(set(b) == {"inputs", "labels", "mask"} for b in batches)
  assert all(b["inputs"].shape == (49, 8, 8, 1) for b in batches)
  assert all(b["mask"].dtype == bool and b["mask"].shape == b["labels"].shape for b in batches)
  assert batches[-1]["mask"].sum() == 17 and batches[0]["mask"].all()
  assert not batches[-1]["inputs"][~batches[-1]["mask"]].any()
  assert not batches[-1]["labels"][~batches[-1]["mask"]].any()
  arrays = dataset.arrays
  labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, arrays.test_labels)
  images = np.concatenate([b["inputs"][b["mask"]] for b in batches])
  expected = augment.normalise(arrays.test_images, 16.0, arrays.mean, arrays.std)
  np.testing.assert_allclose(images, expected)


def test_processes_get_their_slice_of_every_global_batch():
  dataset = digits_data(augment=True)
  whole = dataset.train_batches(48, 0, 5, process_index=0, process_count=1)
  parts = [dataset.train_batches(48, 0, 5, process_index=p, process_count=3) for p in range(3)]
  for _ in range(3):
    expected = next(whole)
    got = [next(p) for p in parts]
    np.testing.assert_array_equal(np.concatenate([g["inputs"] for g in got]), expected["inputs"])
    np.testing.assert_array_equal(np.concatenate([g["labels"] for g in got]), expected["labels"])
  evals = [list(dataset.eval_batches("test", 50, process_index=p, process_count=2))
           for p in range(2)]
  assert len(evals[0]) == len(evals[1]) == 8
  merged = np.concatenate([np.concatenate([a["labels"][a["mask"]], b["labels"][b["mask"]]])
                           for a, b in zip(*evals)])
  np.testing.assert_array_equal(merged, dataset.arrays.test_labels)
  with pytest.raises(ValueError, match="multiple of the process count"):
    dataset.train_batches(50, 0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    dataset.eval_batches("test", 48, process_index=3, process_count=3)


def test_pad_crop_flip_matches_a_loop_reference():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, size=(6, 10, 9, 3), dtype=np.uint8)
  offsets, flips = augment.sample_crop_flip(np.random.default_rng(1), 6, pad=2, flip=True)
  assert offsets.min() >= 0 and offsets.max() <= 4 and flips.any() and not flips.all()
  out = augment.pad_crop_flip(images, offsets, flips, pad=2)
  assert out.shape == images.shape and out.dtype == np.uint8
  for i in range(6):
    padded = np.zeros((14, 13, 3), np.uint8)
    padded[2:12, 2:11] = images[i]
    crop = padded[offsets[i, 0]:offsets[i, 0] + 10, offsets[i, 1]:offsets[i, 1] + 9]
    np.testing.assert_array_equal(out[i], crop[:, ::-1] if flips[i] else crop)
  centred = augment.pad_crop_flip(images, np.full((6, 2), 2), np.zeros(6, bool), pad=2)
  np.testing.assert_array_equal(centred, images)
  _, no_flips = augment.sample_crop_flip(np.random.default_rng(1), 50, pad=2, flip=False)
  assert not no_flips.any()


def test_augmented_batches_keep_labels_and_normalisation():
  plain = next(digits_data().train_batches(256, 0, process_index=0, process_count=1))
  dataset = digits_data(augment=True)
  assert not dataset.mirror_symmetric  # digits are not mirror-symmetric
  augmented = next(dataset.train_batches(256, 0, process_index=0, process_count=1))
  np.testing.assert_array_equal(plain["labels"], augmented["labels"])
  assert augmented["inputs"].shape == plain["inputs"].shape
  assert not np.array_equal(plain["inputs"], augmented["inputs"])
  # A crop only moves pixels or brings in zero padding: every value is a normalised 0..16.
  arrays = dataset.arrays
  allowed = augment.normalise(np.arange(17, dtype=np.uint8).reshape(17, 1, 1, 1), 16.0,
                              arrays.mean, arrays.std).ravel()
  assert np.isin(np.round(augmented["inputs"], 5), np.round(allowed, 5)).all()


def test_normalisation_uses_per_channel_train_statistics():
  images = np.random.default_rng(0).integers(0, 256, size=(500, 4, 4, 3), dtype=np.uint8)
  images[..., 1] //= 4
  mean, std = augment.channel_stats(images, 255.0)
  reference = images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(mean, reference.mean(0), rtol=1e-5)
  np.testing.assert_allclose(std, reference.std(0), rtol=1e-4)
  normalised = augment.normalise(images, 255.0, mean, std)
  np.testing.assert_allclose(normalised.reshape(-1, 3).mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(normalised.reshape(-1, 3).std(0), 1.0, atol=1e-3)


def test_bad_arguments_raise_clear_errors():
  dataset = digits_data()
  with pytest.raises(ValueError, match="split="):
    dataset.num_examples("dev")
  with pytest.raises(ValueError, match="split="):
    dataset.eval_batches("dev", 8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="global_batch_size"):
    dataset.eval_batches("test", 0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="start_step"):
    dataset.train_batches(8, 0, start_step=-1, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="val_fraction"):
    _ = digits_data(val_fraction=1.5).info
  with pytest.raises(ValueError, match="training split is empty"):
    digits_data(val_fraction=0.9999).train_batches(8, 0, process_index=0, process_count=1)


def test_settings_from_a_config_reach_the_data_set():
  config = settings_lib.default_config()
  dataset = data.get_dataset(settings_lib.from_config(config).data)
  assert dataset.info.name == "digits" and dataset.info.split_sizes["validation"] == 144


def test_batches_shard_onto_eight_devices():
  from conftest import run_python
  code = """
import numpy as np
from resmem_jax import data, mesh
from resmem_jax.settings import DataSettings
dataset = data.get_dataset(DataSettings(name="digits", val_fraction=0.1, augment=True))
m = mesh.data_mesh()
assert mesh.num_data_shards(m) == 8
host = next(dataset.train_batches(64, seed=0, start_step=3))
batch = mesh.shard_batch(host, m)
assert batch["inputs"].shape == (64, 8, 8, 1)
assert len(batch["inputs"].sharding.device_set) == 8
np.testing.assert_array_equal(mesh.to_host(batch)["labels"], host["labels"])
total = 0
for host in dataset.eval_batches("test", 48):
  total += int(mesh.to_host(mesh.shard_batch(host, m))["mask"].sum())
assert total == 360, total
print("ok")
"""
  assert run_python(code, devices=8).stdout.strip().endswith("ok")
