"""resmem_jax.data on its TFDS path: mock_data, the offline fail-fast, and (where the archives
exist in ../shared/datasets) real MNIST prepared through manual_dir."""
import json
import time

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from conftest import shared_dataset_dir  # noqa: E402
from resmem_jax import data  # noqa: E402
from resmem_jax.data import sources  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_caches():
  sources.clear_caches()
  yield
  sources.clear_caches()


def cfg_for(name, data_dir, **overrides):
  cfg = dict(name=name, data_dir=str(data_dir), manual_dir=None, val_fraction=0.25,
             train_fraction=1.0, augment=False)
  cfg.update(overrides)
  return cfg


@pytest.mark.parametrize("name,shape,classes", [("mnist", (28, 28, 1), 10),
                                                ("fashion_mnist", (28, 28, 1), 10),
                                                ("cifar10", (32, 32, 3), 10),
                                                ("cifar100", (32, 32, 3), 100)])
def test_in_memory_tfds_sources_under_mock_data(tmp_path, name, shape, classes):
  with tfds.testing.mock_data(num_examples=40):
    cfg = cfg_for(name, tmp_path, augment=True)
    info = data.dataset_info(cfg)
    assert info.num_classes == classes and info.input_shape == shape
    assert info.split_sizes == {"train": 30, "validation": 10, "test": 40}
    batch = next(data.train_batches(cfg, 16, seed=0))
    assert batch["image"].shape == (16,) + shape and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert batch["label"].min() >= 0 and batch["label"].max() < classes
    test = list(data.eval_batches(cfg, "test", 16))
    assert [int(b["mask"].sum()) for b in test] == [16, 16, 8]
    # Held in memory: a second call is served from the cache without TFDS.
    started = time.perf_counter()
    data.dataset_info(cfg)
    assert sources.array_source.cache_info().hits >= 1
    assert time.perf_counter() - started < 1.0


def test_cifar_augmentation_crops_and_flips_mock_images(tmp_path):
  with tfds.testing.mock_data(num_examples=64):
    plain = next(data.train_batches(cfg_for("cifar10", tmp_path), 32, seed=1))
    augmented = next(data.train_batches(cfg_for("cifar10", tmp_path, augment=True), 32, seed=1))
  np.testing.assert_array_equal(plain["label"], augmented["label"])
  assert augmented["image"].shape == (32, 32, 32, 3)
  # Each augmented image is a shifted (possibly mirrored) copy: its 24x24 centre appears in the
  # plain image at some offset within the 4-pixel padding.
  for plain_image, aug_image in zip(plain["image"][:8], augmented["image"][:8]):
    centre = aug_image[4:28, 4:28]
    found = any(np.allclose(candidate[4 + dy:28 + dy, 4 + dx:28 + dx], centre)
                for candidate in (plain_image, plain_image[:, ::-1])
                for dy in range(-4, 5) for dx in range(-4, 5))
    assert found


def write_imagenet_metadata(root, train, validation):
  """The split sizes TFDS would record after preparing (mock_data needs them for ImageNet)."""
  folder = root / "imagenet2012" / "5.1.0"
  folder.mkdir(parents=True)
  splits = [{"name": name, "shardLengths": [str(size)], "numBytes": "0"}
            for name, size in (("train", train), ("validation", validation))]
  (folder / "dataset_info.json").write_text(
      json.dumps({"name": "imagenet2012", "version": "5.1.0", "splits": splits}))


def test_imagenet_streams_resumes_and_pads_under_mock_data(tmp_path):
  write_imagenet_metadata(tmp_path, train=40, validation=40)
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(tmp_path)):
    cfg = cfg_for("imagenet2012", tmp_path, val_fraction=0.0, augment=True, image_size=32)
    info = data.dataset_info(cfg)
    assert info.num_classes == 1000 and info.input_shape == (32, 32, 3)
    assert info.split_sizes == {"train": 40, "validation": 0, "test": 40}
    stream = data.train_batches(cfg, 6, seed=3)
    batches = [next(stream) for _ in range(9)]  # crosses the 40-example epoch boundary
    assert batches[0]["image"].shape == (6, 32, 32, 3)
    assert batches[0]["image"].dtype == np.float32
    for start in (5, 8):
      resumed = next(data.train_batches(cfg, 6, seed=3, start_step=start))
      np.testing.assert_array_equal(resumed["image"], batches[start]["image"])
      np.testing.assert_array_equal(resumed["label"], batches[start]["label"])
    test = list(data.eval_batches(cfg, "test", 16))
    assert [int(b["mask"].sum()) for b in test] == [16, 16, 8]
    assert test[-1]["image"].shape == (16, 32, 32, 3)
    assert not test[-1]["image"][8:].any()


def test_missing_archive_without_network_fails_fast(tmp_path, monkeypatch):
  empty = tmp_path / "manual"
  empty.mkdir()
  # Whatever this machine's network, the download hosts count as unreachable here.
  monkeypatch.setattr(sources, "_host_reachable", lambda host, port: False)
  started = time.perf_counter()
  with pytest.raises(FileNotFoundError, match="manual_dir") as err:
    data.dataset_info(cfg_for("mnist", tmp_path / "tfds", manual_dir=str(empty)))
  assert time.perf_counter() - started < 30
  message = str(err.value)
  assert "train-images-idx3-ubyte.gz" in message and "shared/datasets/mnist" in message
  with pytest.raises(FileNotFoundError, match="downloaded by hand"):
    data.dataset_info(cfg_for("imagenet2012", tmp_path / "tfds", manual_dir=str(empty)))


def test_text_data_set_without_network_fails_fast(tmp_path, monkeypatch):
  from resmem_jax.data import text  # pylint: disable=g-import-not-at-top
  empty = tmp_path / "manual"
  empty.mkdir()
  monkeypatch.setattr(sources, "_host_reachable", lambda host, port: False)
  text._in_memory_text.cache_clear()
  started = time.perf_counter()
  with pytest.raises(FileNotFoundError, match="cannot be reached") as err:
    list(text._raw_documents("tiny_shakespeare", "train", str(tmp_path / "tfds"), str(empty)))
  assert time.perf_counter() - started < 30
  assert "input.txt" in str(err.value) and "shared/datasets/tiny_shakespeare" in str(err.value)


def test_unreachable_host_check_is_quick():
  started = time.perf_counter()
  # Port 9 on a TEST-NET-1 address (RFC 5737) is never served.
  assert not sources._host_reachable("192.0.2.1", 9)
  assert time.perf_counter() - started < sources.REACHABILITY_TIMEOUT_S + 2


@pytest.fixture(scope="session")
def prepared_mnist_dir(tmp_path_factory):
  """Real MNIST prepared once per test session from ../shared/datasets/mnist (~25 s)."""
  manual_dir = shared_dataset_dir("mnist")
  data_dir = tmp_path_factory.mktemp("tfds")
  sources.tfds_builder("mnist", str(data_dir), str(manual_dir))
  return data_dir, manual_dir


def test_real_mnist_through_manual_dir(prepared_mnist_dir):
  data_dir, manual_dir = prepared_mnist_dir
  cfg = cfg_for("mnist", data_dir, manual_dir=str(manual_dir), val_fraction=0.0)
  info = data.dataset_info(cfg)
  assert info.split_sizes == {"train": 60000, "validation": 0, "test": 10000}
  assert info.input_shape == (28, 28, 1)
  source = sources.array_source("mnist", str(data_dir), str(manual_dir))
  assert source.train_images.shape == (60000, 28, 28, 1)
  assert np.bincount(source.test_labels).tolist()[:2] == [980, 1135]  # the published counts
  np.testing.assert_allclose(source.mean, [0.1307], atol=1e-3)  # the well-known MNIST mean
  batch = next(data.train_batches(cfg_for("mnist", data_dir, manual_dir=str(manual_dir)), 128, 0))
  assert batch["image"].shape == (128, 28, 28, 1)
