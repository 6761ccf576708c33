"""ImageNet ResNet-18/34/50/101 and the layers every ResNet here is built from.

The building blocks (convolutions, batch norm, basic and bottleneck blocks, stages) are shared
with the CIFAR family (``cifar_resnet.py``). Both families take NHWC images and return
``(logits, embedding)`` where the embedding is the globally average-pooled output of the last
stage. ``width`` multiplies every stage's channel count (the knob for the paper's model-size
sweep). Batch statistics live in the ``batch_stats`` collection:
call ``apply(..., train=True, mutable=["batch_stats"])`` while training and ``train=False``
(running averages) for evaluation. Under ``jax.jit`` with a batch sharded over a mesh, the batch
moments are computed over the global batch, so results do not depend on the device count.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resmem_jax.settings import CONV_IMPLS, ModelSettings

# He initialisation (fan-out, normal) as in the original ResNet papers.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# depth -> (blocks per stage, uses bottleneck blocks)
IMAGENET_DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
}


def im2col_conv(x, kernel, strides: int, padding: int):
  """NHWC conv as one matmul over stacked shifted views ("im2col").

  Same result as ``lax.conv_general_dilated`` with HWIO ``kernel``; on CPU its gradient is two
  large matmuls plus cheap slicing, which XLA runs much closer to the matmul peak than its
  native backward convolutions.
  """
  kh, kw, cin, cout = kernel.shape
  b, h, w, _ = x.shape
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho = (h + 2 * padding - kh) // strides + 1
  wo = (w + 2 * padding - kw) // strides + 1
  views = [x[:, i:i + strides * (ho - 1) + 1:strides, j:j + strides * (wo - 1) + 1:strides, :]
           for i in range(kh) for j in range(kw)]
  patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
  return patches @ kernel.reshape(kh * kw * cin, cout)


class Conv(nn.Module):
  """Bias-free square conv with the same ``kernel`` parameter as ``nn.Conv``; ``impl`` picks
  XLA's native convolution ("xla") or ``im2col_conv`` ("im2col")."""
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  dtype: Any = jnp.float32
  impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _conv_init,
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
    if self.impl == "im2col":
      return im2col_conv(x, kernel, self.strides, self.padding)
    return jax.lax.conv_general_dilated(
        x, kernel, (self.strides, self.strides), [(self.padding, self.padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def scaled_channels(base: int, width: float) -> int:
  """A stage's channels: ``base`` times the width multiplier, at least 1."""
  return max(1, int(round(base * width)))


def batch_norm(train: bool, dtype: Any):
  """BatchNorm as every ResNet layer here uses it (batch statistics only while training)."""
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, dtype=dtype)


class _Block(nn.Module):
  """What every residual block shares: its fields, its conv / norm layers and its shortcut."""
  features: int
  strides: int
  dtype: Any
  train: bool
  conv_impl: str = "xla"

  def layers(self):
    """(conv, norm) constructors in this block's dtype and convolution implementation."""
    return (functools.partial(Conv, dtype=self.dtype, impl=self.conv_impl),
            batch_norm(self.train, self.dtype))

  def shortcut(self, x, out_features: int, conv, norm):
    """Identity, or a 1x1 projection where the block changes the shape."""
    if self.strides != 1 or x.shape[-1] != out_features:
      x = conv(out_features, 1, strides=self.strides, name="shortcut_conv")(x)
      x = norm(name="shortcut_norm")(x)
    return x


class BasicBlock(_Block):
  """Two 3x3 convs with a residual connection (projection shortcut when the shape changes)."""

  @nn.compact
  def __call__(self, x):
    conv, norm = self.layers()
    y = conv(self.features, 3, strides=self.strides, padding=1)(x)
    y = nn.relu(norm()(y))
    y = conv(self.features, 3, padding=1)(y)
    y = norm()(y)
    return nn.relu(self.shortcut(x, self.features, conv, norm) + y)


class BottleneckBlock(_Block):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection."""

  @nn.compact
  def __call__(self, x):
    conv, norm = self.layers()
    out_features = 4 * self.features
    y = nn.relu(norm()(conv(self.features, 1)(x)))
    y = conv(self.features, 3, strides=self.strides, padding=1)(y)
    y = nn.relu(norm()(y))
    y = norm()(conv(out_features, 1)(y))
    return nn.relu(self.shortcut(x, out_features, conv, norm) + y)


def run_stages(x, stage_sizes: Sequence[int], stage_channels: Sequence[int], block_cls,
               dtype, train, conv_impl):
  for stage, (num_blocks, features) in enumerate(zip(stage_sizes, stage_channels, strict=True)):
    for block in range(num_blocks):
      strides = 2 if stage > 0 and block == 0 else 1
      x = block_cls(features=features, strides=strides, dtype=dtype, train=train,
                    conv_impl=conv_impl, name=f"stage{stage + 1}_block{block + 1}")(x)
  return x


def resnet_outputs(x, *, num_classes: int, channels: Sequence[int], stage_sizes: Sequence[int],
                   block_cls, stem_kernel: int, stem_strides: int, max_pool: bool, dtype, train,
                   conv_impl) -> tuple:
  """Stem conv + norm, the stages, global average pool (the embedding), linear head.

  Both ResNet families; called from their compact ``__call__`` (the layers are its children).
  """
  x = jnp.asarray(x, dtype)
  x = Conv(channels[0], stem_kernel, strides=stem_strides, padding=stem_kernel // 2, dtype=dtype,
           impl=conv_impl, name="stem_conv")(x)
  x = nn.relu(batch_norm(train, dtype)(name="stem_norm")(x))
  if max_pool:
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  x = run_stages(x, stage_sizes, channels, block_cls, dtype, train, conv_impl)
  embedding = jnp.mean(x, axis=(1, 2))
  logits = nn.Dense(num_classes, dtype=dtype, name="head")(embedding)
  return logits.astype(jnp.float32), embedding.astype(jnp.float32)


class ResNet(nn.Module):
  """Fields of both ResNet families (``depth`` is family-specific, ``width`` multiplies channels)."""
  num_classes: int
  depth: int
  width: float = 1.0
  dtype: Any = jnp.float32
  conv_impl: str = "xla"  # "im2col": convs as matmuls


class ImageNetResNet(ResNet):
  """ResNet-18/34 (basic blocks) and 50/101 (bottleneck blocks) for 224x224 ImageNet."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in IMAGENET_DEPTHS:
      raise ValueError(f"depth must be one of {sorted(IMAGENET_DEPTHS)}, got {self.depth}")
    stage_sizes, bottleneck = IMAGENET_DEPTHS[self.depth]
    return resnet_outputs(
        x, num_classes=self.num_classes,
        channels=[scaled_channels(c, self.width) for c in (64, 128, 256, 512)],
        stage_sizes=stage_sizes, block_cls=BottleneckBlock if bottleneck else BasicBlock,
        stem_kernel=7, stem_strides=2, max_pool=True, dtype=self.dtype, train=train,
        conv_impl=self.conv_impl)


def check_conv_impl(settings: ModelSettings) -> None:
  """``model.conv_impl``, read by both ResNet families."""
  if settings.conv_impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl must be 'xla' or 'im2col', got {settings.conv_impl!r}")


def check_width(settings: ModelSettings) -> None:
  """``model.width``: a channel multiplier in both ResNet families."""
  if not settings.width > 0:
    raise ValueError(f"model.width (channel multiplier) must be positive for {settings.name}, "
                     f"got {settings.width!r}")


def check(settings: ModelSettings) -> None:
  """``model.depth`` (18, 34, 50 or 101), ``model.width`` (multiplier), ``model.conv_impl``."""
  if settings.depth not in IMAGENET_DEPTHS:
    raise ValueError(f"model.depth must be one of {sorted(IMAGENET_DEPTHS)} for resnet, "
                     f"got {settings.depth!r}")
  check_width(settings)
  check_conv_impl(settings)


def build(settings: ModelSettings, num_classes: int, dtype: Any) -> ImageNetResNet:
  check(settings)
  return ImageNetResNet(num_classes=num_classes, depth=settings.depth, width=float(settings.width),
                        dtype=dtype, conv_impl=settings.conv_impl)
