"""resmem_jax.data on its TFDS path: any image classification set under mock_data, name checks,
the offline fail-fast, and (where the archives exist in ../shared/datasets) real MNIST prepared
through manual_dir."""
import json
import pathlib
import time

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from conftest import shared_dataset_dir  # noqa: E402
from resmem_jax import data  # noqa: E402
from resmem_jax.data import augment, text, tfds_images, tfds_prepare  # noqa: E402
from resmem_jax.settings import DataSettings  # noqa: E402

ONE_PROCESS = dict(process_index=0, process_count=1)


def dataset_for(name, data_dir, **overrides) -> data.Dataset:
  fields = dict(name=name, data_dir=str(data_dir), val_fraction=0.25)
  fields.update(overrides)
  return data.get_dataset(DataSettings(**fields))


@pytest.fixture()
def split_reads(monkeypatch):
  """The TFDS splits read into memory, in order (spies on tfds_images.read_split)."""
  reads = []
  real = tfds_images.read_split

  def spy(builder, split, image_size):
    reads.append(split)
    return real(builder, split, image_size)

  monkeypatch.setattr(tfds_images, "read_split", spy)
  return reads


def write_metadata(data_dir, name, sizes):
  """The split sizes TFDS would record after preparing (read under MockPolicy.USE_FILES)."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  folder = pathlib.Path(builder.data_dir)
  folder.mkdir(parents=True)
  splits = [{"name": split, "shardLengths": [str(size)], "numBytes": "0"}
            for split, size in sizes.items()]
  (folder / "dataset_info.json").write_text(
      json.dumps({"name": builder.name, "version": str(builder.version), "splits": splits}))


def mock_with_metadata(data_dir, num_examples):
  return tfds.testing.mock_data(num_examples=num_examples, data_dir=str(data_dir),
                                policy=tfds.testing.MockPolicy.USE_FILES)


def tfds_test_split(name, data_dir, split="test"):
  """(images, labels) of a TFDS split read directly, one example at a time."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  pairs = list(tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True)))
  return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def is_shifted_copy(plain_image, aug_image, pad, mirrored_ok):
  """Whether ``aug_image``'s centre appears in ``plain_image`` at an offset within ``pad``."""
  h, w = plain_image.shape[:2]
  centre = aug_image[pad:h - pad, pad:w - pad]
  candidates = (plain_image, plain_image[:, ::-1]) if mirrored_ok else (plain_image,)
  return any(np.allclose(c[pad + dy:h - pad + dy, pad + dx:w - pad + dx], centre)
             for c in candidates for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1))


@pytest.mark.parametrize("name,shape,classes", [("mnist", (28, 28, 1), 10),
                                                ("fashion_mnist", (28, 28, 1), 10),
                                                ("cifar10", (32, 32, 3), 10),
                                                ("cifar100", (32, 32, 3), 100),
                                                ("svhn_cropped", (32, 32, 3), 10),
                                                ("emnist/letters", (28, 28, 1), 37)])
def test_tfds_image_sets_under_mock_data(tmp_path, split_reads, name, shape, classes):
  with tfds.testing.mock_data(num_examples=40):
    dataset = dataset_for(name, tmp_path, augment=True)
    info = dataset.info
    assert info.name == name and info.num_classes == classes and info.input_shape == shape
    assert info.input_dtype == "float32"
    assert info.split_sizes == {"train": 30, "validation": 10, "test": 40}
    batch = next(dataset.train_batches(16, seed=0, **ONE_PROCESS))
    assert batch["inputs"].shape == (16,) + shape and batch["inputs"].dtype == np.float32
    assert batch["labels"].shape == (16,) and batch["labels"].dtype == np.int32
    assert batch["labels"].min() >= 0 and batch["labels"].max() < classes
    test = list(dataset.eval_batches("test", 16, **ONE_PROCESS))
    assert [int(b["mask"].sum()) for b in test] == [16, 16, 8]
    assert all(b["mask"].dtype == bool and b["mask"].shape == (16,) for b in test)
    assert not test[-1]["inputs"][8:].any() and not test[-1]["labels"][8:].any()
    # Every test example exactly once, in TFDS's order.
    images, labels = tfds_test_split(name, tmp_path)
    np.testing.assert_array_equal(np.concatenate([b["labels"][b["mask"]] for b in test]), labels)
    a = dataset.arrays
    np.testing.assert_allclose(np.concatenate([b["inputs"][b["mask"]] for b in test]),
                               augment.normalise(images, 255.0, a.mean, a.std))
    # Held in memory: TFDS's train and test splits were read once, and never again.
    started = time.perf_counter()
    dataset.info, dataset.num_examples("validation")
    next(dataset.train_batches(16, seed=1, **ONE_PROCESS))
    assert split_reads == ["train", "test"]
    assert time.perf_counter() - started < 1.0
  assert dataset.mirror_symmetric == (name in ("cifar10", "cifar100"))


def test_cifar_augmentation_crops_and_flips_mock_images(tmp_path):
  with tfds.testing.mock_data(num_examples=64):
    plain = next(dataset_for("cifar10", tmp_path).train_batches(32, seed=1, **ONE_PROCESS))
    augmented = next(dataset_for("cifar10", tmp_path, augment=True).train_batches(
        32, seed=1, **ONE_PROCESS))
  np.testing.assert_array_equal(plain["labels"], augmented["labels"])
  assert augmented["inputs"].shape == (32, 32, 32, 3)
  # Each augmented image is a shifted (possibly mirrored) copy within the 4-pixel padding.
  for plain_image, aug_image in zip(plain["inputs"][:8], augmented["inputs"][:8]):
    assert is_shifted_copy(plain_image, aug_image, 4, mirrored_ok=True)
  assert not all(is_shifted_copy(p, a, 4, mirrored_ok=False)
                 for p, a in zip(plain["inputs"][:8], augmented["inputs"][:8]))


def test_letters_are_cropped_but_never_mirrored(tmp_path):
  with tfds.testing.mock_data(num_examples=64):
    plain = next(dataset_for("emnist/letters", tmp_path).train_batches(32, seed=1, **ONE_PROCESS))
    augmented = next(dataset_for("emnist/letters", tmp_path, augment=True).train_batches(
        32, seed=1, **ONE_PROCESS))
  assert not np.array_equal(plain["inputs"], augmented["inputs"])
  for plain_image, aug_image in zip(plain["inputs"][:8], augmented["inputs"][:8]):
    assert is_shifted_copy(plain_image, aug_image, 28 // 8, mirrored_ok=False)


def test_variable_size_images_need_image_size(tmp_path, split_reads):
  with tfds.testing.mock_data(num_examples=20):
    refused = dataset_for("oxford_flowers102", tmp_path)
    with pytest.raises(ValueError, match=r"oxford_flowers102.*varying size.*data\.image_size"):
      _ = refused.info
    assert split_reads == []  # refused before reading anything
    dataset = dataset_for("oxford_flowers102", tmp_path, image_size=16, augment=True)
    info = dataset.info
    assert info.num_classes == 102 and info.input_shape == (16, 16, 3)
    assert dataset.arrays.train_images.dtype == np.uint8
    batch = next(dataset.train_batches(8, seed=0, **ONE_PROCESS))
    assert batch["inputs"].shape == (8, 16, 16, 3) and batch["labels"].max() < 102
    test = list(dataset.eval_batches("test", 8, **ONE_PROCESS))
    assert sum(int(b["mask"].sum()) for b in test) == 20
  # A fixed-size set is resized too when image_size is set.
  with tfds.testing.mock_data(num_examples=8):
    assert dataset_for("mnist", tmp_path, image_size=12).info.input_shape == (12, 12, 1)


def test_test_split_falls_back_to_validation(tmp_path, split_reads):
  write_metadata(tmp_path, "svhn_cropped", {"train": 40, "validation": 40})
  with mock_with_metadata(tmp_path, 40):
    assert dataset_for("svhn_cropped", tmp_path).info.split_sizes["test"] == 40
  assert split_reads == ["train", "validation"]
  only_train = tmp_path / "only_train"
  write_metadata(only_train, "svhn_cropped", {"train": 40})
  with mock_with_metadata(only_train, 40):
    with pytest.raises(ValueError, match="neither a 'test' nor a 'validation' split"):
      _ = dataset_for("svhn_cropped", only_train).info


def test_sets_too_large_for_memory_are_refused_before_reading(tmp_path, split_reads):
  write_metadata(tmp_path, "svhn_cropped", {"train": 6_000_000, "test": 26_032})
  with mock_with_metadata(tmp_path, 8):
    with pytest.raises(ValueError, match=r"svhn_cropped.*17\.\d GiB.*16 GiB"):
      _ = dataset_for("svhn_cropped", tmp_path).info
  assert split_reads == []


def test_check_name_accepts_image_classification_sets_quickly():
  started = time.perf_counter()
  for name in ("svhn_cropped", "emnist/letters", "oxford_flowers102", "mnist", "cifar10:3.0.2"):
    data.check_name(name)
  for name in data.known_datasets():
    data.check_name(name)
  assert time.perf_counter() - started < 30


def test_check_name_errors_and_suggestions():
  with pytest.raises(ValueError, match=r"data.name='svhn' is not a known data set \(did you mean "
                                       r"'svhn_cropped'\?\); built-in: ") as err:
    data.check_name("svhn")
  message = str(err.value)
  assert "\n" not in message and "any TFDS image classification set" in message
  assert all(name in message for name in data.known_datasets())
  with pytest.raises(ValueError, match="did you mean 'imagenet2012'"):
    data.check_name("imagenet")  # a built-in before TFDS's imagenette
  with pytest.raises(ValueError, match="did you mean 'emnist/letters'"):
    data.check_name("emnist/leters")
  with pytest.raises(ValueError, match="did you mean 'mnist'.*version 9.9.9"):
    data.check_name("mnist:9.9.9")
  with pytest.raises(ValueError, match=r"data.name='binarized_mnist' is a TFDS data set but not an "
                                       r"image classification set \(it needs an Image input and a "
                                       r"ClassLabel label"):
    data.check_name("binarized_mnist")
  with pytest.raises(ValueError, match="'imdb_reviews' is a TFDS data set but not an image "
                                       "classification set.*Text -> ClassLabel"):
    data.check_name("imdb_reviews")
  with pytest.raises(ValueError, match="did you mean 'svhn_cropped'"):
    data.get_dataset(DataSettings(name="svhn"))


def test_imagenet_streams_resumes_and_pads_under_mock_data(tmp_path):
  write_metadata(tmp_path, "imagenet2012", {"train": 40, "validation": 40})
  with mock_with_metadata(tmp_path, 40):
    dataset = dataset_for("imagenet2012", tmp_path, val_fraction=0.0, augment=True, image_size=32)
    info = dataset.info
    assert info.num_classes == 1000 and info.input_shape == (32, 32, 3)
    assert info.input_dtype == "float32"
    assert info.split_sizes == {"train": 40, "validation": 0, "test": 40}
    assert dataset_for("imagenet2012", tmp_path).info.input_shape == (224, 224, 3)  # the default
    stream = dataset.train_batches(6, seed=3, **ONE_PROCESS)
    batches = [next(stream) for _ in range(9)]  # crosses the 40-example epoch boundary
    assert batches[0]["inputs"].shape == (6, 32, 32, 3)
    assert batches[0]["inputs"].dtype == np.float32 and batches[0]["labels"].dtype == np.int32
    for start in (5, 8):
      resumed = next(dataset.train_batches(6, seed=3, start_step=start, **ONE_PROCESS))
      np.testing.assert_array_equal(resumed["inputs"], batches[start]["inputs"])
      np.testing.assert_array_equal(resumed["labels"], batches[start]["labels"])
    test = list(dataset.eval_batches("test", 16, **ONE_PROCESS))
    assert [int(b["mask"].sum()) for b in test] == [16, 16, 8]
    assert test[-1]["inputs"].shape == (16, 32, 32, 3) and test[-1]["mask"].dtype == bool
    assert not test[-1]["inputs"][8:].any() and not test[-1]["labels"][8:].any()


def test_missing_archive_without_network_fails_fast(tmp_path, monkeypatch):
  empty = tmp_path / "manual"
  empty.mkdir()
  # Whatever this machine's network, the download hosts count as unreachable here.
  monkeypatch.setattr(tfds_prepare, "_host_reachable", lambda host, port: False)
  started = time.perf_counter()
  with pytest.raises(FileNotFoundError, match="manual_dir") as err:
    _ = dataset_for("mnist", tmp_path / "tfds", manual_dir=str(empty)).info
  assert time.perf_counter() - started < 30
  message = str(err.value)
  assert "train-images-idx3-ubyte.gz" in message and "--config.data.manual_dir=" in message
  with pytest.raises(FileNotFoundError, match="downloaded by hand"):
    _ = dataset_for("imagenet2012", tmp_path / "tfds", manual_dir=str(empty)).info


def test_text_data_set_without_network_fails_fast(tmp_path, monkeypatch):
  empty = tmp_path / "manual"
  empty.mkdir()
  monkeypatch.setattr(tfds_prepare, "_host_reachable", lambda host, port: False)
  dataset = dataset_for("tiny_shakespeare", tmp_path / "tfds", manual_dir=str(empty))
  assert isinstance(dataset, text.TextDataset)
  started = time.perf_counter()
  with pytest.raises(FileNotFoundError, match="cannot be reached") as err:
    list(dataset.documents("train"))
  assert time.perf_counter() - started < 30
  assert "input.txt" in str(err.value) and "--config.data.manual_dir=" in str(err.value)


def test_unreachable_host_check_is_quick():
  started = time.perf_counter()
  # Port 9 on a TEST-NET-1 address (RFC 5737) is never served.
  assert not tfds_prepare._host_reachable("192.0.2.1", 9)
  assert time.perf_counter() - started < tfds_prepare.REACHABILITY_TIMEOUT_S + 2


@pytest.fixture(scope="session")
def prepared_mnist_dir(tmp_path_factory):
  """Real MNIST prepared once per test session from ../shared/datasets/mnist (~25 s)."""
  manual_dir = shared_dataset_dir("mnist")
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds_prepare.tfds_builder("mnist", str(data_dir), str(manual_dir))
  return data_dir, manual_dir


@pytest.mark.slow
def test_real_mnist_through_manual_dir(prepared_mnist_dir):
  data_dir, manual_dir = prepared_mnist_dir
  dataset = dataset_for("mnist", data_dir, manual_dir=str(manual_dir), val_fraction=0.0)
  info = dataset.info
  assert info.split_sizes == {"train": 60000, "validation": 0, "test": 10000}
  assert info.input_shape == (28, 28, 1) and info.num_classes == 10
  arrays = dataset.arrays
  assert arrays.train_images.shape == (60000, 28, 28, 1)
  assert np.bincount(arrays.test_labels).tolist()[:2] == [980, 1135]  # the published counts
  np.testing.assert_allclose(arrays.mean, [0.1307], atol=1e-3)  # the well-known MNIST mean
  batch = next(dataset_for("mnist", data_dir, manual_dir=str(manual_dir)).train_batches(
      128, 0, **ONE_PROCESS))
  assert batch["inputs"].shape == (128, 28, 28, 1)
