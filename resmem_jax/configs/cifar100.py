"""CIFAR-100 (TFDS ``cifar100``): the paper's model-size sweep over CIFAR ResNet depth/width.

Sweep e.g. ``--config.model.depth=56 --config.model.width=2``. Variants as cifar10.py.
"""
from resmem_jax.configs import cifar10


VARIANTS = cifar10.VARIANTS

def get_config(variant: str | None = None):
  return cifar10.cifar_like("cifar100", variant)
