"""The CIFAR ResNets of He et al. (2016): depth 6n+2, width multiplier ``width``.

Built from the blocks in ``resnet.py`` (batch norm, basic blocks); returns ``(logits, embedding)``
with the globally average-pooled output of the last stage as the embedding.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from resmem_jax.models.resnet import (BasicBlock, ResNet, check_conv_impl, check_width,
                                      resnet_outputs, scaled_channels)
from resmem_jax.settings import ModelSettings


class CifarResNet(ResNet):
  """He et al. (2016) CIFAR ResNet: depth = 6n+2, three stages of n basic blocks at
  16, 32, 64 channels (times ``width``), 3x3 stem, global average pool, linear head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 2) % 6 or self.depth < 8:
      raise ValueError(f"depth must be 6n+2 >= 8, got {self.depth}")
    return resnet_outputs(
        x, num_classes=self.num_classes,
        channels=[scaled_channels(c, self.width) for c in (16, 32, 64)],
        stage_sizes=((self.depth - 2) // 6,) * 3, block_cls=BasicBlock, stem_kernel=3,
        stem_strides=1, max_pool=False, dtype=self.dtype, train=train, conv_impl=self.conv_impl)


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
