"""Character-level tiny_shakespeare: a small decoder-only Transformer, ResMem and kNN-LM.

  resmem-jax --config=tiny_shakespeare --workdir=/tmp/ts
  resmem-jax --config=tiny_shakespeare:tiny --workdir=/tmp/t

Offline, TFDS prepares the data from ``data.manual_dir`` (the original ``input.txt``); elsewhere
leave it unset and TFDS downloads. ``data.data_dir`` is where TFDS writes the prepared records.
"""
from resmem_jax.configs import common


# The named variants ("" is the default), listed by --help and by the error for any other.
VARIANTS = ("", "tiny")

def lm_resmem_config(cfg):
  """LM settings of the ``resmem`` section: sparse per-token residuals and kNN-LM beside ResMem."""
  cfg.resmem.backend = "scann"
  cfg.resmem.residual_format = "sparse"  # per-token memory: dense vocabulary rows do not scale
  cfg.resmem.top_m = 16
  cfg.resmem.k_grid = (1, 2, 4, 8, 16, 32, 64)
  cfg.resmem.temperature_grid = (0.5, 1.0, 2.0)
  cfg.resmem.knnlm = True
  cfg.resmem.select_by = "accuracy"  # the same rule for ResMem and kNN-LM
  cfg.resmem.evaluate_train = False  # one memory entry per training token: no train pass
  cfg.resmem.timing_repeats = 1
  cfg.resmem.eval_batch_size = 256  # sequences per inference batch
  return cfg


def get_config(variant: str | None = None):
  cfg = common.base_config()
  cfg.data.name = "tiny_shakespeare"
  cfg.data.seq_len = 64

  # Sized to train in about ten minutes on two shared CPU cores (0.43M parameters).
  cfg.model.name = "transformer"
  cfg.model.width = 128
  cfg.model.depth = 2
  cfg.model.num_heads = 4
  cfg.model.max_len = 64
  cfg.model.mlp_ratio = 4
  cfg.model.dropout_rate = 0.0

  cfg.train.num_steps = 2000
  cfg.train.batch_size = 32
  cfg.train.eval_batch_size = 64
  cfg.train.optimizer = "adamw"
  cfg.train.learning_rate = 3e-3
  cfg.train.b2 = 0.99
  cfg.train.weight_decay = 0.01
  cfg.train.schedule = "cosine"
  cfg.train.warmup_epochs = 0.2  # about 100 steps
  cfg.train.grad_clip_norm = 1.0
  cfg.train.log_every_steps = 100
  cfg.train.eval_every_steps = 500
  cfg.train.checkpoint_every_steps = 500
  lm_resmem_config(cfg)

  if variant == "tiny":
    cfg.data.seq_len = 32
    cfg.data.max_split_tokens = 20000  # first 20k characters of each split
    cfg.model.width = 32
    cfg.model.depth = 1
    cfg.model.num_heads = 2
    cfg.model.max_len = 32
    cfg.train.num_steps = 20
    cfg.train.batch_size = 8
    cfg.train.log_every_steps = 10
    cfg.train.eval_every_steps = 20
    cfg.train.checkpoint_every_steps = 20
    cfg.resmem.k_grid = (1, 4)
    cfg.resmem.sigma_grid = (0.1, 1.0)
    cfg.resmem.temperature_grid = (1.0,)
    cfg.resmem.knn_lambda_grid = (0.1, 0.5)
    cfg.resmem.backend = "exact"
    cfg.resmem.max_validation_rows = 2048
  elif variant:
    raise common.unknown_variant("tiny_shakespeare", variant, VARIANTS)
  return cfg
