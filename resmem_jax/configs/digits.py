"""scikit-learn digits (8x8, 10 classes, embedded in the package: no download).

  resmem-jax-train --config=digits --workdir=/tmp/digits
  resmem-jax-train --config=digits:tiny --workdir=/tmp/t
"""
from resmem_jax.configs import common


# The named variants ("" is the default), listed by --help and by the error for any other.
VARIANTS = ("", "tiny")

def get_config(variant: str | None = None):
  cfg = common.base_config()
  cfg.data.name = "digits"
  cfg.data.val_fraction = 0.1
  cfg.model.name = "mlp"
  cfg.model.width = 128
  cfg.model.depth = 2
  cfg.train.num_epochs = 30
  cfg.train.batch_size = 64
  cfg.train.eval_batch_size = 256
  cfg.train.learning_rate = 0.05
  cfg.train.weight_decay = 1e-4
  cfg.train.log_every_steps = 20
  cfg.train.checkpoint_every_steps = 100
  if variant == "tiny":
    cfg.model.width = 32
    cfg.model.depth = 1
    cfg.train.num_epochs = 2
    cfg.train.batch_size = 32
    cfg.train.log_every_steps = 10
    cfg.train.checkpoint_every_steps = 20
  elif variant:
    raise common.unknown_variant("digits", variant, VARIANTS)
  return cfg
