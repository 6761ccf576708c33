"""Fashion-MNIST (TFDS ``fashion_mnist``); same shapes and variants as mnist.py."""
from resmem_jax.configs import mnist


VARIANTS = mnist.VARIANTS

def get_config(variant: str | None = None):
  cfg = mnist.mnist_like("fashion_mnist", variant)
  if not variant:
    cfg.train.num_epochs = 10
  return cfg
