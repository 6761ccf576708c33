"""The CIFAR ResNets of He et al. (2016): depth 6n+2, width multiplier ``width``.

Built from the blocks in ``resnet.py`` (batch norm, basic blocks); returns ``(logits, embedding)``
with the globally average-pooled output of the last stage as the embedding.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resmem_jax.models.resnet import (BasicBlock, Conv, batch_norm, check_conv_impl, check_width,
                                      run_stages, scaled_channels)
from resmem_jax.settings import ModelSettings


class CifarResNet(nn.Module):
  """He et al. (2016) CIFAR ResNet: depth = 6n+2, three stages of n basic blocks at
  16, 32, 64 channels (times ``width``), 3x3 stem, global average pool, linear head."""
  num_classes: int
  depth: int = 20
  width: float = 1.0
  dtype: Any = jnp.float32
  conv_impl: str = "xla"  # "im2col": convs as matmuls (faster training on CPU)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 2) % 6 or self.depth < 8:
      raise ValueError(f"depth must be 6n+2 >= 8, got {self.depth}")
    blocks = (self.depth - 2) // 6
    channels = [scaled_channels(c, self.width) for c in (16, 32, 64)]
    x = jnp.asarray(x, self.dtype)
    x = Conv(channels[0], 3, padding=1, dtype=self.dtype, impl=self.conv_impl,
             name="stem_conv")(x)
    x = batch_norm(train, self.dtype)(name="stem_norm")(x)
    x = nn.relu(x)
    x = run_stages(x, (blocks,) * 3, channels, BasicBlock, self.dtype, train,
                   self.conv_impl)
    embedding = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(embedding)
    return logits.astype(jnp.float32), embedding.astype(jnp.float32)


def check(settings: ModelSettings) -> None:
  """``model.depth`` (6n+2 >= 8), ``model.width`` (multiplier), ``model.conv_impl``."""
  if settings.depth < 8 or (settings.depth - 2) % 6:
    raise ValueError(f"model.depth must be 6n+2 >= 8 for cifar_resnet, got {settings.depth!r}")
  check_width(settings)
  check_conv_impl(settings)


def build(settings: ModelSettings, num_classes: int, dtype: Any) -> CifarResNet:
  check(settings)
  return CifarResNet(num_classes=num_classes, depth=settings.depth, width=float(settings.width),
                     dtype=dtype, conv_impl=settings.conv_impl)
