"""The duck-typed pairs have one declared interface each: both memories are a ResidualMemory,
every registry data set and a user's splits are a DataSource."""
import numpy as np
import pytest

from resmem_jax import data as data_lib
from resmem_jax.data import base, user
from resmem_jax.memory import build_memory, hosts
from resmem_jax.memory.protocol import ResidualMemory
from resmem_jax.settings import DataSettings


def test_both_memories_are_residual_memories():
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(12, 3)).astype(np.float32)
  residuals = rng.normal(size=(12, 4)).astype(np.float32)
  memory = build_memory(keys, residuals, labels=np.arange(12) % 4)
  sharded = hosts.build_host_sharded_memory(keys, residuals)  # one process: a single part
  assert isinstance(memory, ResidualMemory) and isinstance(sharded, ResidualMemory)
  assert not isinstance(keys, ResidualMemory)
  # The protocol's reads answer alike on both (one process holds every row).
  np.testing.assert_array_equal(memory.search(keys[:2], 3)[1], sharded.search(keys[:2], 3)[1])
  assert memory.size == sharded.size == 12 and memory.num_outputs == sharded.num_outputs == 4


@pytest.mark.parametrize("name", sorted(data_lib.DATASETS) + ["mnist"])
def test_registry_data_sets_and_user_splits_are_data_sources(name):
  dataset = data_lib.get_dataset(DataSettings(name=name))  # nothing is read until used
  assert isinstance(dataset, base.DataSource)
  splits = user.UserSplits({"test": (np.zeros((3, 2), np.float32), np.zeros(3, np.int32))})
  assert isinstance(splits, base.DataSource)
  assert splits.num_examples("test") == 3
  assert not isinstance(np.zeros(3), base.DataSource)
