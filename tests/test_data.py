"""Tests for resmem_jax.data on the embedded digits and the pure split / batch / augment helpers."""
import numpy as np
import pytest

from resmem_jax import data
from resmem_jax.data import augment, sources, splits


def digits_cfg(**overrides):
  cfg = dict(name="digits", data_dir=None, manual_dir=None, val_fraction=0.1,
             train_fraction=1.0, augment=False)
  cfg.update(overrides)
  return cfg


def test_digits_source_is_real_and_split_deterministically():
  from sklearn.datasets import load_digits
  info = data.dataset_info(digits_cfg(val_fraction=0.0))
  assert info.name == "digits" and info.num_classes == 10 and info.input_shape == (8, 8, 1)
  assert info.split_sizes == {"train": 1797 - 360, "validation": 0, "test": 360}
  train_x, train_y, test_x, test_y = sources._load_digits()
  again = sources._load_digits()
  np.testing.assert_array_equal(test_x, again[2])
  # Train and test together are exactly scikit-learn's 1797 images, each once.
  everything = np.concatenate([train_x, test_x]).reshape(1797, -1)
  reference = load_digits().images.astype(np.uint8).reshape(1797, -1)
  labels = np.concatenate([train_y, test_y])
  order_ours = np.lexsort(np.c_[everything, labels].T)
  order_ref = np.lexsort(np.c_[reference, load_digits().target].T)
  np.testing.assert_array_equal(everything[order_ours], reference[order_ref])
  np.testing.assert_array_equal(labels[order_ours], load_digits().target[order_ref])


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
  cfg = digits_cfg(val_fraction=0.2)
  views = sources.split_views("digits", None, None, 0.2, 1.0, 0)
  assert not set(views["train"].indices) & set(views["validation"].indices)
  assert len(views["train"]) + len(views["validation"]) == 1437
  assert data.num_examples(cfg, "validation") == round(0.2 * 1437)
  labels = np.concatenate([b["label"][b["mask"]] for b in data.eval_batches(cfg, "validation", 64)])
  np.testing.assert_array_equal(labels, views["validation"].labels[views["validation"].indices])


def test_train_fraction_is_nested_deterministic_and_inside_train():
  full = sources.split_views("digits", None, None, 0.1, 1.0, 0)["train"].indices
  half = sources.split_views("digits", None, None, 0.1, 0.5, 0)["train"].indices
  tenth = sources.split_views("digits", None, None, 0.1, 0.1, 0)["train"].indices
  assert len(half) == round(0.5 * len(full)) and len(tenth) == round(0.1 * len(full))
  assert set(tenth) <= set(half) <= set(full)
  np.testing.assert_array_equal(half, splits.subsample(full, 0.5))
  assert data.num_examples(digits_cfg(train_fraction=0.5), "train") == len(half)
  # The validation split does not depend on the training fraction.
  assert data.num_examples(digits_cfg(train_fraction=0.5), "validation") == \
      data.num_examples(digits_cfg(), "validation")
  with pytest.raises(ValueError, match="train_fraction"):
    splits.subsample(full, 0.0)


def test_training_stream_covers_each_epoch_once():
  n, batch = 23, 5
  stream = np.concatenate([splits.train_batch_indices(n, batch, 7, s) for s in range(n * 3)])
  for epoch in range(3 * batch):  # n*3 steps of 5 = 15 epochs of 23
    np.testing.assert_array_equal(np.sort(stream[epoch * n:(epoch + 1) * n]), np.arange(n))
  assert not np.array_equal(stream[:n], stream[n:2 * n])  # fresh permutation per epoch


def test_train_batches_resume_exactly_and_depend_on_seed():
  cfg = digits_cfg(augment=True)
  stream = data.train_batches(cfg, 64, seed=3)
  first = [next(stream) for _ in range(25)]  # crosses the epoch boundary (1293 / 64)
  for start in (0, 7, 20, 24):
    resumed = next(data.train_batches(cfg, 64, seed=3, start_step=start))
    np.testing.assert_array_equal(resumed["image"], first[start]["image"])
    np.testing.assert_array_equal(resumed["label"], first[start]["label"])
  other = next(data.train_batches(cfg, 64, seed=4))
  assert not np.array_equal(other["label"], first[0]["label"])
  assert first[0]["image"].dtype == np.float32 and first[0]["label"].dtype == np.int32
  assert first[0]["image"].shape == (64, 8, 8, 1)


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
  cfg = digits_cfg()
  batches = list(data.eval_batches(cfg, "test", 49))  # 360 = 7 * 49 + 17
  assert len(batches) == 8
  assert all(b["image"].shape == (49, 8, 8, 1) for b in batches)
  assert batches[-1]["mask"].sum() == 17 and batches[0]["mask"].all()
  assert not batches[-1]["image"][~batches[-1]["mask"]].any()
  source = sources.array_source("digits", None, None)
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, source.test_labels)
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  expected = augment.normalise(source.test_images, 16.0, source.mean, source.std)
  np.testing.assert_allclose(images, expected)


def test_processes_get_their_slice_of_every_global_batch():
  cfg = digits_cfg(augment=True)
  whole = data.train_batches(cfg, 48, 0, 5, process_index=0, process_count=1)
  parts = [data.train_batches(cfg, 48, 0, 5, process_index=p, process_count=3) for p in range(3)]
  for _ in range(3):
    expected = next(whole)
    got = [next(p) for p in parts]
    np.testing.assert_array_equal(np.concatenate([g["image"] for g in got]), expected["image"])
    np.testing.assert_array_equal(np.concatenate([g["label"] for g in got]), expected["label"])
  evals = [list(data.eval_batches(cfg, "test", 50, process_index=p, process_count=2))
           for p in range(2)]
  assert len(evals[0]) == len(evals[1]) == 8
  merged = np.concatenate([np.concatenate([a["label"][a["mask"]], b["label"][b["mask"]]])
                           for a, b in zip(*evals)])
  np.testing.assert_array_equal(merged, sources.array_source("digits", None, None).test_labels)
  with pytest.raises(ValueError, match="multiple of the process count"):
    data.train_batches(cfg, 50, 0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    data.eval_batches(cfg, "test", 48, process_index=3, process_count=3)


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
  plain = next(data.train_batches(digits_cfg(), 256, 0))
  augmented = next(data.train_batches(digits_cfg(augment=True), 256, 0))
  np.testing.assert_array_equal(plain["label"], augmented["label"])
  assert augmented["image"].shape == plain["image"].shape
  assert not np.array_equal(plain["image"], augmented["image"])
  # A crop only moves pixels or brings in zero padding: every value is a normalised 0..16.
  source = sources.array_source("digits", None, None)
  allowed = augment.normalise(np.arange(17, dtype=np.uint8).reshape(17, 1, 1, 1), 16.0,
                              source.mean, source.std).ravel()
  assert np.isin(np.round(augmented["image"], 5), np.round(allowed, 5)).all()


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
  with pytest.raises(ValueError, match="known: .*cifar10.*digits.*mnist") as err:
    data.dataset_info(digits_cfg(name="svhn"))
  assert all(name in str(err.value) for name in data.known_datasets())
  with pytest.raises(ValueError, match="split="):
    data.num_examples(digits_cfg(), "dev")
  with pytest.raises(ValueError, match="global_batch_size"):
    data.eval_batches(digits_cfg(), "test", 0)
  with pytest.raises(ValueError, match="start_step"):
    data.train_batches(digits_cfg(), 8, 0, start_step=-1)
  with pytest.raises(ValueError, match="val_fraction"):
    data.dataset_info(digits_cfg(val_fraction=1.5))


def test_config_dict_is_accepted():
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(name="digits", data_dir=None, manual_dir=None,
                                       val_fraction=0.1, train_fraction=1.0, augment=False))
  assert data.dataset_info(cfg).split_sizes["validation"] == 144


def test_batches_shard_onto_eight_devices():
  from conftest import run_python
  code = """
import numpy as np
from resmem_jax import data, mesh
cfg = dict(name="digits", val_fraction=0.1, augment=True)
m = mesh.data_mesh()
assert mesh.num_data_shards(m) == 8
host = next(data.train_batches(cfg, 64, seed=0, start_step=3))
batch = mesh.shard_batch(host, m)
assert batch["image"].shape == (64, 8, 8, 1)
assert len(batch["image"].sharding.device_set) == 8
np.testing.assert_array_equal(mesh.to_host(batch)["label"], host["label"])
total = 0
for host in data.eval_batches(cfg, "test", 48):
  total += int(mesh.to_host(mesh.shard_batch(host, m))["mask"].sum())
assert total == 360, total
print("ok")
"""
  assert run_python(code, devices=8).stdout.strip().endswith("ok")
