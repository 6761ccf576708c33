"""Fully connected classifier: flatten, ``depth`` ReLU layers of ``width`` units, linear head."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resmem_jax.settings import ModelSettings


class MLP(nn.Module):
  """Returns (logits [b, num_classes] float32, embedding [b, width] = last hidden layer)."""
  num_classes: int
  width: int = 256
  depth: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout or batch norm
    x = jnp.asarray(x, self.dtype).reshape((x.shape[0], -1))
    for i in range(self.depth):
      x = nn.relu(nn.Dense(self.width, dtype=self.dtype, name=f"hidden_{i}")(x))
    embedding = x
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(embedding)
    return logits.astype(jnp.float32), embedding.astype(jnp.float32)


def check(settings: ModelSettings) -> None:
  """``model.width`` (units) and ``model.depth`` (hidden layers)."""
  if not (settings.width >= 1 and float(settings.width).is_integer()):
    raise ValueError(f"model.width (hidden units) must be a whole number >= 1 for mlp, got "
                     f"{settings.width!r}")
  if settings.depth < 1:
    raise ValueError(f"model.depth (hidden layers) must be >= 1 for mlp, got {settings.depth!r}")


def build(settings: ModelSettings, num_classes: int, dtype: Any) -> MLP:
  check(settings)
  return MLP(num_classes=num_classes, width=int(settings.width), depth=settings.depth,
             dtype=dtype)
