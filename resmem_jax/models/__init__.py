"""Flax models for ResMem's base networks, each returning ``(logits, embedding)``.

The embedding is the network's penultimate features: the vector ResMem indexes. ``model.name``
picks one of the registered models, each a module here that checks its own ``ModelSettings``
fields (``check``) and builds the flax Module (``build``):

  ``mlp``           fully connected net (``width`` hidden units, ``depth`` hidden layers)
  ``cnn``           small conv net for 28x28 / 8x8 images (``width`` channels in the first block)
  ``cifar_resnet``  CIFAR ResNet of depth 6n+2 with width multiplier ``width``
  ``resnet``        ImageNet ResNet-18/34/50/101 (``depth``) with width multiplier ``width``
  ``transformer``   decoder-only Transformer LM over token ids (``width``, ``depth``, ``num_heads``)

ResNets take ``model.conv_impl``: "xla" (native convolutions, default) or "im2col"
(convolutions as matmuls over stacked shifted views); both give the same parameters and
results. On the 2-core CPU measured here im2col was slower (see experiments/bench_train.py).

Usage::

  module = build_model(settings.model, num_classes=10, dtype=settings.train.dtype)
  variables = module.init(rng, images, train=False)
  logits, embedding = module.apply(variables, images, train=False)
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax.models import cifar_resnet
from resmem_jax.models import cnn
from resmem_jax.models import mlp
from resmem_jax.models import resnet
from resmem_jax.models import transformer
from resmem_jax.models.cifar_resnet import CifarResNet
from resmem_jax.models.cnn import SmallCNN
from resmem_jax.models.mlp import MLP
from resmem_jax.models.resnet import ImageNetResNet
from resmem_jax.models.transformer import TransformerLM
from resmem_jax import settings as settings_lib
from resmem_jax import suggest
from resmem_jax.settings import ModelSettings

# model.name -> the module that checks its settings (check) and builds it (build).
REGISTRY = {
    "mlp": mlp,
    "cnn": cnn,
    "cifar_resnet": cifar_resnet,
    "resnet": resnet,
    "transformer": transformer,
}
MODEL_NAMES = tuple(REGISTRY)

# train.dtype's choices are settings.DTYPES, each named as its jnp type.
_DTYPES = {name: getattr(jnp, name) for name in settings_lib.DTYPES}


def compute_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' | 'float16' (``train.dtype``) -> the jnp dtype."""
  if name not in _DTYPES:
    raise ValueError(f"train.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
  return _DTYPES[name]


def _registered(name: str):
  if name not in REGISTRY:
    raise ValueError(f"model.name={name!r} is not a model{suggest.did_you_mean(name, MODEL_NAMES)}"
                     f"; valid names: {', '.join(MODEL_NAMES)}")
  return REGISTRY[name]


def check_settings(settings: ModelSettings) -> None:
  """Raises ValueError (naming the field) unless ``settings`` builds a model; creates nothing."""
  _registered(settings.name).check(settings)


def build_model(settings: ModelSettings, num_classes: int, dtype: str = "float32"):
  """The flax Module named by ``settings.name`` with ``num_classes`` outputs.

  ``dtype`` names the compute dtype (``train.dtype``); parameters stay float32 and logits and
  embeddings are always returned in float32.
  """
  family = _registered(settings.name)
  if (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
      or num_classes < 1):
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  return family.build(settings, int(num_classes), compute_dtype(dtype))


def count_params(params) -> int:
  """Number of scalar parameters in a params tree (or a variables dict holding ``"params"``).

  Batch-norm running statistics are not parameters and are not counted.
  """
  if hasattr(params, "keys") and "params" in params:
    params = params["params"]
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))


__all__ = ["build_model", "check_settings", "count_params", "compute_dtype", "MODEL_NAMES",
           "REGISTRY", "MLP", "SmallCNN", "CifarResNet", "ImageNetResNet", "TransformerLM"]
