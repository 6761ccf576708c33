"""CIFAR-10 (TFDS ``cifar10``) with a CIFAR ResNet (depth 6n+2, width multiplier).

Schedule of He et al.: SGD momentum 0.9, lr 0.1 (batch 128), weight decay 1e-4, pad-crop+flip.
Variants: '' (ResNet-20, 160 epochs, cosine), 'tiny' (ResNet-8 width 0.25, a few steps).
"""
from resmem_jax.configs import common


# The named variants ("" is the default), listed by --help and by the error for any other.
VARIANTS = ("", "tiny")

def get_config(variant: str | None = None):
  return cifar_like("cifar10", variant)


def cifar_like(name: str, variant: str | None):
  cfg = common.base_config()
  cfg.data.name = name
  cfg.data.val_fraction = 0.1
  cfg.data.augment = True
  cfg.model.name = "cifar_resnet"
  cfg.model.depth = 20
  cfg.model.width = 1.0
  cfg.train.num_epochs = 160
  cfg.train.batch_size = 128
  cfg.train.eval_batch_size = 1000
  cfg.train.learning_rate = 0.1
  cfg.train.weight_decay = 1e-4
  cfg.train.warmup_epochs = 1.0
  cfg.train.schedule = "cosine"
  cfg.train.log_every_steps = 100
  cfg.train.checkpoint_every_steps = 1000
  if variant == "tiny":
    cfg.model.depth = 8
    cfg.model.width = 0.25
    cfg.train.num_epochs = 1
    cfg.train.num_steps = 4
    cfg.train.batch_size = 16
    cfg.train.eval_batch_size = 256
    cfg.train.warmup_epochs = 0.0
    cfg.data.train_fraction = 0.01
    cfg.train.log_every_steps = 1
    cfg.train.checkpoint_every_steps = 4
  elif variant:
    raise common.unknown_variant(name, variant, VARIANTS)
  return cfg
