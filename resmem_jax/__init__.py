"""resmem_jax: ResMem (residual memorization) in JAX/Flax.

    import resmem_jax
    resmem = resmem_jax.fit(model, variables, train=(x, y), validation=(x_val, y_val))
    resmem.predict(x_test); resmem.evaluate(x_test, y_test)          # the model-level API

    r = resmem_jax.residuals(labels, logits, temperature=1.0)        # onehot(y) - softmax(z / T)
    memory = resmem_jax.build_memory(train_embeddings, r, backend="exact")
    pred = resmem_jax.predict(memory, base_probs, test_embeddings, k=16, sigma=0.5)

Layout: ``core/`` the math (pure array functions), ``memory/`` a residual store + a search index,
``data/`` and ``models/`` registries, ``training/``, ``inference.py`` (one masked pass),
``fitting.py`` (memory, choice on validation, prediction, evaluation around a base model),
``api.py`` (``fit`` around your own model), ``jobs/`` (a workdir: the engine and the
experiments), ``cli/`` (the command-line tools), ``configs/`` (their packaged configs),
``settings.py`` (the config, typed and checked).
Heavy modules (TFDS, ScaNN, Orbax) are imported only when first used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily so `import resmem_jax` stays fast)
_LAZY = {
    "residuals": "resmem_jax.core.residuals",
    "regression_residuals": "resmem_jax.core.residuals",
    "build_memory": "resmem_jax.memory",
    "load_memory": "resmem_jax.memory",
    "Memory": "resmem_jax.memory",
    "predict": "resmem_jax.resmem",
    "residual_estimate": "resmem_jax.resmem",
    "fit": "resmem_jax.api",
    "ResMem": "resmem_jax.api",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'resmem_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
