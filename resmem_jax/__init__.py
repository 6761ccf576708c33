"""resmem_jax: ResMem (residual memorization) in JAX/Flax.

    import resmem_jax
    r = resmem_jax.residuals(labels, logits, temperature=1.0)
    mem = resmem_jax.build_memory(train_embeddings, r, backend="exact")
    pred = mem.predict(base_probs, test_embeddings, k=16, sigma=0.5)

Heavy modules (TFDS, ScaNN, Orbax) are imported only when first used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily so `import resmem_jax` stays fast)
_LAZY = {
    "residuals": "resmem_jax.residuals",
    "regression_residuals": "resmem_jax.residuals",
    "build_memory": "resmem_jax.memory",
    "load_memory": "resmem_jax.memory",
    "Memory": "resmem_jax.memory",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'resmem_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
