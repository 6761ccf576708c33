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

from resmem_jax.settings import ModelSettings


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


def check(settings: ModelSettings) -> None:
  """``model.width`` (a multiple of ``model.num_heads``), ``depth``, ``max_len``, ``mlp_ratio``."""
  if settings.num_heads < 1:
    raise ValueError(f"model.num_heads must be >= 1 for transformer, got {settings.num_heads!r}")
  width = settings.width
  if not (width >= 1 and float(width).is_integer() and int(width) % settings.num_heads == 0):
    raise ValueError(f"model.width ({width}) must be a positive multiple of model.num_heads "
                     f"({settings.num_heads}) for transformer")
  if settings.depth < 1:
    raise ValueError(f"model.depth (blocks) must be >= 1 for transformer, got {settings.depth!r}")
  if settings.max_len < 1:
    raise ValueError(f"model.max_len must be >= 1 for transformer, got {settings.max_len!r}")
  if settings.mlp_ratio < 1:
    raise ValueError(f"model.mlp_ratio must be >= 1 for transformer, got {settings.mlp_ratio!r}")
  if not 0.0 <= settings.dropout_rate < 1.0:
    raise ValueError(f"model.dropout_rate must be in [0, 1), got {settings.dropout_rate!r}")


def build(settings: ModelSettings, num_classes: int, dtype: Any) -> TransformerLM:
  """TransformerLM over a vocabulary of ``num_classes`` tokens (the data set's ``num_classes``)."""
  check(settings)
  if num_classes < 2:
    raise ValueError(f"num_classes (vocabulary size) must be >= 2, got {num_classes}")
  return TransformerLM(
      vocab_size=num_classes, width=int(settings.width), depth=settings.depth,
      num_heads=settings.num_heads, max_len=settings.max_len, mlp_ratio=settings.mlp_ratio,
      dropout_rate=settings.dropout_rate, dtype=dtype)
