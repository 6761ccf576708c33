"""A decoder-only Transformer language model in Flax (linen).

Pre-LayerNorm blocks of causal multi-head self-attention and a GELU MLP over learned token and
position embeddings. ``apply(variables, tokens, train=False)`` returns ``(logits [b, L, V],
hidden [b, L, D])``: ``hidden`` is the final (normalised) hidden state at each position, the key
ResMem and kNN-LM use for the per-token memory, and ``logits`` are its linear read-out.

Position t attends to positions <= t only, so the outputs at t depend on tokens[:t + 1] alone.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class CausalSelfAttentionBlock(nn.Module):
  """One pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""
  width: int
  num_heads: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool):
    deterministic = not train or self.dropout_rate == 0.0
    y = nn.LayerNorm(dtype=self.dtype, name="ln_attention")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=self.width, out_features=self.width,
        dtype=self.dtype, dropout_rate=self.dropout_rate, deterministic=deterministic,
        name="attention")(y, y, mask=mask)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    y = nn.Dense(self.mlp_ratio * self.width, dtype=self.dtype, name="mlp_in")(y)
    y = nn.gelu(y)
    y = nn.Dense(self.width, dtype=self.dtype, name="mlp_out")(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    return x + y


class TransformerLM(nn.Module):
  """Decoder-only Transformer: int tokens [b, L] -> (logits [b, L, vocab], hidden [b, L, width])."""
  vocab_size: int
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  max_len: int = 128
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be int [batch, length], got shape {tokens.shape}")
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"tokens length {length} exceeds model max_len {self.max_len}")
    token_embed = nn.Embed(self.vocab_size, self.width, name="token_embed")
    position_embed = self.param("position_embed", nn.initializers.normal(stddev=0.02),
                                (self.max_len, self.width))
    x = token_embed(tokens.astype(jnp.int32)) + position_embed[None, :length]
    x = x.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train or self.dropout_rate == 0.0)
    # [b, 1, L, L] lower-triangular: query t sees keys 0..t.
    mask = nn.make_causal_mask(tokens)
    for i in range(self.depth):
      x = CausalSelfAttentionBlock(self.width, self.num_heads, self.mlp_ratio, self.dropout_rate,
                                   self.dtype, name=f"block_{i}")(x, mask, train)
    hidden = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x).astype(jnp.float32)
    logits = nn.Dense(self.vocab_size, dtype=jnp.float32, name="lm_head")(hidden)
    return logits, hidden


def build(model_cfg, num_classes: int, dtype=None) -> TransformerLM:
  """TransformerLM from a model config (``width``, ``depth``, ``num_heads``, ``max_len``, ...).

  ``num_classes`` is the vocabulary size (``dataset_info(data_cfg).num_classes``). ``dtype`` is
  the compute dtype; None reads ``model_cfg.dtype`` (float32 when absent).
  """
  get = model_cfg.get if hasattr(model_cfg, "get") else lambda k, d=None: getattr(model_cfg, k, d)
  if num_classes is None or int(num_classes) < 2:
    raise ValueError(f"num_classes (vocabulary size) must be >= 2, got {num_classes}")
  width = int(get("width", 128))
  num_heads = int(get("num_heads", 4))
  if width <= 0 or num_heads <= 0 or width % num_heads:
    raise ValueError(f"model.width ({width}) must be a positive multiple of model.num_heads "
                     f"({num_heads})")
  depth = int(get("depth", 2))
  if depth < 1:
    raise ValueError(f"model.depth must be >= 1, got {depth}")
  if dtype is None:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(str(get("dtype", "float32")))
    if dtype is None:
      raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {get('dtype')!r}")
  return TransformerLM(
      vocab_size=int(num_classes), width=width, depth=depth, num_heads=num_heads,
      max_len=int(get("max_len", 128)), mlp_ratio=int(get("mlp_ratio", 4)),
      dropout_rate=float(get("dropout_rate", 0.0)), dtype=dtype)
