"""Small conv net for 28x28 (MNIST-like) and 8x8 (digits) images.

``depth`` blocks of [3x3 conv, ReLU, 2x2 max-pool]; channels start at ``width`` and double per
block. Pooling stops once the feature map is 2x2 so 8x8 inputs work with any depth. Then a
dense ReLU layer of ``embed_dim`` units (the embedding) and a linear head.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resmem_jax.settings import ModelSettings


class SmallCNN(nn.Module):
  """Input NHWC; returns (logits float32, embedding [b, embed_dim] float32)."""
  num_classes: int
  width: int = 32
  depth: int = 2
  embed_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = jnp.asarray(x, self.dtype)
    if x.ndim == 3:  # grayscale without a channel axis
      x = x[..., None]
    for i in range(self.depth):
      x = nn.Conv(self.width * 2 ** i, (3, 3), padding="SAME", dtype=self.dtype,
                  name=f"conv_{i}")(x)
      x = nn.relu(x)
      if min(x.shape[1], x.shape[2]) >= 4:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    embedding = nn.relu(nn.Dense(self.embed_dim, dtype=self.dtype, name="embed")(x))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(embedding)
    return logits.astype(jnp.float32), embedding.astype(jnp.float32)


def check(settings: ModelSettings) -> None:
  """``model.width`` (first block's channels), ``model.depth`` (blocks), ``model.embed_dim``."""
  if not (settings.width >= 1 and float(settings.width).is_integer()):
    raise ValueError(f"model.width (channels of the first block) must be a whole number >= 1 for "
                     f"cnn, got {settings.width!r}")
  if settings.depth < 1:
    raise ValueError(f"model.depth (conv blocks) must be >= 1 for cnn, got {settings.depth!r}")
  if settings.embed_dim < 1:
    raise ValueError(f"model.embed_dim must be >= 1 for cnn, got {settings.embed_dim!r}")


def build(settings: ModelSettings, num_classes: int, dtype: Any) -> SmallCNN:
  check(settings)
  return SmallCNN(num_classes=num_classes, width=int(settings.width), depth=settings.depth,
                  embed_dim=settings.embed_dim, dtype=dtype)
