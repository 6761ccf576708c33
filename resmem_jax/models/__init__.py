"""Flax models for ResMem's base networks, each returning ``(logits, embedding)``.

The embedding is the network's penultimate features: the vector ResMem indexes. Models are
chosen by ``model_cfg.name``:

  ``mlp``           fully connected net (``width`` hidden units, ``depth`` hidden layers)
  ``cnn``           small conv net for 28x28 / 8x8 images (``width`` channels in the first block)
  ``cifar_resnet``  CIFAR ResNet of depth 6n+2 with width multiplier ``width``
  ``resnet``        ImageNet ResNet-18/34/50/101 (``depth``) with width multiplier ``width``

ResNets take ``model_cfg.conv_impl``: "xla" (native convolutions, default) or "im2col"
(convolutions as matmuls over stacked shifted views); both give the same parameters and
results. On the 2-core CPU measured here im2col was slower (see experiments/bench_train.py).
  ``transformer``   decoder-only LM, defined in ``resmem_jax/models/transformer.py``

Usage::

  module = build_model(config.model, num_classes=10)
  variables = module.init(rng, images, train=False)
  logits, embedding = module.apply(variables, images, train=False)
"""
from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax.models.mlp import MLP
from resmem_jax.models.cnn import SmallCNN
from resmem_jax.models.resnet import CifarResNet, ImageNetResNet, IMAGENET_DEPTHS

MODEL_NAMES = ("mlp", "cnn", "cifar_resnet", "resnet", "transformer")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str | None) -> Any:
  """'float32' | 'bfloat16' | 'float16' (or None -> float32) -> the jnp dtype."""
  if name is None:
    return jnp.float32
  if name not in _DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
  return _DTYPES[name]


def _get(cfg, field, default):
  value = cfg.get(field, default) if hasattr(cfg, "get") else getattr(cfg, field, default)
  return default if value is None else value


def build_model(model_cfg, num_classes: int, dtype: Any = None):
  """Returns the flax Module named by ``model_cfg.name`` with ``num_classes`` outputs.

  ``dtype`` is the compute dtype (parameters stay float32); when None it is read from
  ``model_cfg.dtype`` if present, else float32. Logits are always returned in float32.
  """
  name = _get(model_cfg, "name", None)
  if name not in MODEL_NAMES:
    raise ValueError(f"model_cfg.name must be one of {MODEL_NAMES}, got {name!r}")
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  num_classes = int(num_classes)
  if dtype is None:
    dtype = compute_dtype(_get(model_cfg, "dtype", "float32"))
  elif isinstance(dtype, str):
    dtype = compute_dtype(dtype)

  if name == "transformer":
    # Registered hook: the LM engineer's module is imported only when asked for.
    transformer = importlib.import_module("resmem_jax.models.transformer")
    return transformer.build(model_cfg, num_classes, dtype=dtype)

  width = _get(model_cfg, "width", None)
  depth = _get(model_cfg, "depth", None)
  if width is None or not width > 0:
    raise ValueError(f"model_cfg.width must be positive, got {width!r}")
  if name == "mlp":
    if depth is None or int(depth) < 1:
      raise ValueError(f"model_cfg.depth (hidden layers) must be >= 1 for mlp, got {depth!r}")
    return MLP(num_classes=num_classes, width=int(width), depth=int(depth), dtype=dtype)
  if name == "cnn":
    depth = 2 if depth is None else int(depth)
    if depth < 1:
      raise ValueError(f"model_cfg.depth (conv blocks) must be >= 1 for cnn, got {depth!r}")
    return SmallCNN(num_classes=num_classes, width=int(width), depth=depth,
                    embed_dim=int(_get(model_cfg, "embed_dim", 128)), dtype=dtype)
  conv_impl = _get(model_cfg, "conv_impl", "xla")
  if conv_impl not in ("xla", "im2col"):
    raise ValueError(f"model_cfg.conv_impl must be 'xla' or 'im2col', got {conv_impl!r}")
  if name == "cifar_resnet":
    if depth is None or int(depth) < 8 or (int(depth) - 2) % 6:
      raise ValueError(f"model_cfg.depth must be 6n+2 >= 8 for cifar_resnet, got {depth!r}")
    return CifarResNet(num_classes=num_classes, depth=int(depth), width=float(width), dtype=dtype,
                       conv_impl=conv_impl)
  # name == "resnet"
  if depth not in IMAGENET_DEPTHS:
    raise ValueError(f"model_cfg.depth must be one of {sorted(IMAGENET_DEPTHS)} for resnet, "
                     f"got {depth!r}")
  return ImageNetResNet(num_classes=num_classes, depth=int(depth), width=float(width), dtype=dtype,
                        conv_impl=conv_impl)


def count_params(params) -> int:
  """Number of scalar parameters in a params tree (or a variables dict holding ``"params"``).

  Batch-norm running statistics are not parameters and are not counted.
  """
  if hasattr(params, "keys") and "params" in params:
    params = params["params"]
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))


__all__ = ["build_model", "count_params", "compute_dtype", "MODEL_NAMES", "MLP", "SmallCNN",
           "CifarResNet", "ImageNetResNet"]
