"""lm1b (One Billion Word) with a subword vocabulary: a Transformer LM, ResMem and kNN-LM.

Sized for an accelerator run; here it is only exercised on TFDS mock data (the tiny variant).

  resmem-jax --config=lm1b --workdir=gs://.../lm1b \
      --config.data.data_dir=gs://.../tfds

The subword vocabulary (``data.vocab_size`` entries, built from the first ``data.vocab_documents``
training sentences) is saved under ``data.vocab_dir`` (default ``<data_dir>/resmem_vocab``).
Validation is the first 1% of lm1b's training split; test is lm1b's test split.
"""
from resmem_jax.configs import common
from resmem_jax.configs import tiny_shakespeare


# The named variants ("" is the default), listed by --help and by the error for any other.
VARIANTS = ("", "tiny")

def subword_lm_config(name: str, variant: str | None):
  """Shared by lm1b and c4: a subword Transformer LM trained for a fixed number of steps."""
  cfg = common.base_config()
  cfg.data.name = name
  cfg.data.seq_len = 256
  cfg.data.vocab_size = 32768
  cfg.data.vocab_documents = 100000

  cfg.model.name = "transformer"
  cfg.model.width = 512
  cfg.model.depth = 8
  cfg.model.num_heads = 8
  cfg.model.max_len = 256
  cfg.model.mlp_ratio = 4
  cfg.model.dropout_rate = 0.0

  cfg.train.num_steps = 100000
  cfg.train.batch_size = 256
  cfg.train.eval_batch_size = 256
  cfg.train.optimizer = "adamw"
  cfg.train.learning_rate = 1e-3
  cfg.train.b2 = 0.98
  cfg.train.weight_decay = 0.01
  cfg.train.schedule = "cosine"
  cfg.train.warmup_epochs = 0.0
  cfg.train.grad_clip_norm = 1.0
  cfg.train.dtype = "bfloat16"
  cfg.train.log_every_steps = 200
  cfg.train.eval_every_steps = 5000
  cfg.train.checkpoint_every_steps = 2000
  tiny_shakespeare.lm_resmem_config(cfg)
  cfg.resmem.top_m = 32
  cfg.resmem.max_validation_rows = 1_000_000  # validation tokens used to choose k, sigma, T

  if variant == "tiny":
    cfg.data.seq_len = 16
    cfg.data.vocab_size = 300
    cfg.data.vocab_documents = 50
    cfg.data.max_split_tokens = 2000
    cfg.model.width = 32
    cfg.model.depth = 1
    cfg.model.num_heads = 2
    cfg.model.max_len = 16
    cfg.train.num_steps = 10
    cfg.train.batch_size = 8
    cfg.train.eval_batch_size = 32
    cfg.train.dtype = "float32"
    cfg.train.log_every_steps = 5
    cfg.train.eval_every_steps = 10
    cfg.train.checkpoint_every_steps = 10
    cfg.resmem.backend = "exact"
    cfg.resmem.top_m = 8
    cfg.resmem.k_grid = (1, 4)
    cfg.resmem.sigma_grid = (0.1, 1.0)
    cfg.resmem.temperature_grid = (1.0,)
    cfg.resmem.knn_lambda_grid = (0.1, 0.5)
    cfg.resmem.eval_batch_size = 32
  elif variant:
    raise common.unknown_variant(name, variant, VARIANTS)
  return cfg


def get_config(variant: str | None = None):
  return subword_lm_config("lm1b", variant)
