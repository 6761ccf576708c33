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

from resmem_jax.settings import ModelSettings

# He initialisation (fan-out, normal) as in the original ResNet papers.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

CONV_IMPLS = ("xla", "im2col")

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


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection (projection shortcut when the shape changes)."""
  features: int
  strides: int
  dtype: Any
  train: bool
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(Conv, dtype=self.dtype, impl=self.conv_impl)
    norm = batch_norm(self.train, self.dtype)
    y = conv(self.features, 3, strides=self.strides, padding=1)(x)
    y = nn.relu(norm()(y))
    y = conv(self.features, 3, padding=1)(y)
    y = norm()(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, strides=self.strides, name="shortcut_conv")(x)
      x = norm(name="shortcut_norm")(x)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection."""
  features: int
  strides: int
  dtype: Any
  train: bool
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(Conv, dtype=self.dtype, impl=self.conv_impl)
    norm = batch_norm(self.train, self.dtype)
    out_features = 4 * self.features
    y = nn.relu(norm()(conv(self.features, 1)(x)))
    y = conv(self.features, 3, strides=self.strides, padding=1)(y)
    y = nn.relu(norm()(y))
    y = norm()(conv(out_features, 1)(y))
    if self.strides != 1 or x.shape[-1] != out_features:
      x = conv(out_features, 1, strides=self.strides, name="shortcut_conv")(x)
      x = norm(name="shortcut_norm")(x)
    return nn.relu(x + y)


def run_stages(x, stage_sizes: Sequence[int], stage_channels: Sequence[int], block_cls,
               dtype, train, conv_impl):
  for stage, (num_blocks, features) in enumerate(zip(stage_sizes, stage_channels)):
    for block in range(num_blocks):
      strides = 2 if stage > 0 and block == 0 else 1
      x = block_cls(features=features, strides=strides, dtype=dtype, train=train,
                    conv_impl=conv_impl, name=f"stage{stage + 1}_block{block + 1}")(x)
  return x


class ImageNetResNet(nn.Module):
  """ResNet-18/34 (basic blocks) and 50/101 (bottleneck blocks) for 224x224 ImageNet."""
  num_classes: int
  depth: int = 50
  width: float = 1.0
  dtype: Any = jnp.float32
  conv_impl: str = "xla"  # "im2col": convs as matmuls (faster training on CPU)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in IMAGENET_DEPTHS:
      raise ValueError(f"depth must be one of {sorted(IMAGENET_DEPTHS)}, got {self.depth}")
    stage_sizes, bottleneck = IMAGENET_DEPTHS[self.depth]
    channels = [scaled_channels(c, self.width) for c in (64, 128, 256, 512)]
    x = jnp.asarray(x, self.dtype)
    x = Conv(channels[0], 7, strides=2, padding=3, dtype=self.dtype, impl=self.conv_impl,
             name="stem_conv")(x)
    x = batch_norm(train, self.dtype)(name="stem_norm")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block_cls = BottleneckBlock if bottleneck else BasicBlock
    x = run_stages(x, stage_sizes, channels, block_cls, self.dtype, train, self.conv_impl)
    embedding = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(embedding)
    return logits.astype(jnp.float32), embedding.astype(jnp.float32)


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
