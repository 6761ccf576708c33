"""ImageNet (TFDS ``imagenet2012``, manual download into ``data.manual_dir``) with ResNet-50.

Goyal et al. schedule: SGD momentum 0.9, lr 0.1 x batch/256, 5 warm-up epochs, cosine, weight
decay 1e-4, label smoothing 0.1, bfloat16 compute. Variants: '' (ResNet-50, 90 epochs),
'tiny' (ResNet-18 width 0.125, a few steps).
"""
from resmem_jax.configs import common


# The named variants ("" is the default), listed by --help and by the error for any other.
VARIANTS = ("", "tiny")

def get_config(variant: str | None = None):
  cfg = common.base_config()
  cfg.data.name = "imagenet2012"
  cfg.data.val_fraction = 0.01
  cfg.data.augment = True
  cfg.model.name = "resnet"
  cfg.model.depth = 50
  cfg.model.width = 1.0
  cfg.train.num_epochs = 90
  cfg.train.batch_size = 1024
  cfg.train.eval_batch_size = 1024
  cfg.train.learning_rate = 0.1 * 1024 / 256
  cfg.train.weight_decay = 1e-4
  cfg.train.warmup_epochs = 5.0
  cfg.train.label_smoothing = 0.1
  cfg.train.dtype = "bfloat16"
  cfg.train.log_every_steps = 100
  cfg.train.checkpoint_every_steps = 2000
  # 1.28M x 1000 dense float32 residuals would be 5 GB: keep the true label + top-32 probabilities
  # (about 200 bytes per example; error bound in resmem_jax/memory/store.py).
  cfg.resmem.residual_format = "sparse"
  cfg.resmem.top_m = 32
  cfg.resmem.eval_batch_size = 1024
  cfg.resmem.timing_repeats = 1  # one timed pass over the 50k test images is enough here
  if variant == "tiny":
    cfg.model.depth = 18
    cfg.model.width = 0.125
    cfg.train.num_epochs = 1
    cfg.train.num_steps = 2
    cfg.train.batch_size = 8
    cfg.train.eval_batch_size = 8
    cfg.train.learning_rate = 0.1
    cfg.train.warmup_epochs = 0.0
    cfg.train.dtype = "float32"
    cfg.data.train_fraction = 0.001
    cfg.train.log_every_steps = 1
    cfg.train.checkpoint_every_steps = 2
  elif variant:
    raise common.unknown_variant("imagenet", variant, VARIANTS)
  return cfg
