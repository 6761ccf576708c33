"""C4 (English) with a subword vocabulary: a Transformer LM, ResMem and kNN-LM.

Sized for an accelerator run; here it is only exercised on TFDS mock data (the tiny variant).

  resmem-jax --config=c4 --workdir=gs://.../c4 \
      --config.data.data_dir=gs://.../tfds

C4's validation split is halved: the first half tunes k, sigma, T and lambda, the second is the
test split. The memory holds every training token, so cap the training split for a run that fits
in host memory (``--config.data.max_split_tokens``; it caps every split).
"""
from resmem_jax.configs import lm1b


VARIANTS = lm1b.VARIANTS

def get_config(variant: str | None = None):
  cfg = lm1b.subword_lm_config("c4", variant)
  cfg.data.seq_len = 512 if not variant else cfg.data.seq_len
  cfg.model.max_len = cfg.data.seq_len
  return cfg
