"""The loss and the jittable train and eval steps.

Every data set's batches hold ``{"inputs", "labels"}`` and, where some positions do not count
(padding of the last eval batch, text), ``"mask"`` with the shape of ``labels``: ``[b]`` for
images, ``[b, L]`` for tokens. The loss is the masked mean cross-entropy over every label
position, whatever its shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from resmem_jax.training.state import TrainState

BATCH_KEYS = ("inputs", "labels", "mask")


def model_batch(batch: dict) -> dict:
  """The arrays the steps read (``inputs``, ``labels`` and ``mask`` when present)."""
  return {key: batch[key] for key in BATCH_KEYS if key in batch}


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-position softmax cross-entropy of integer ``labels`` [...] under ``logits`` [..., C]."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def loss_sums(logits, batch: dict, label_smoothing: float = 0.0) -> dict:
  """Masked sums: {"loss": sum of CE, "correct": sum of hits, "count": number of targets}.

  The reported loss excludes label smoothing only when ``label_smoothing`` is 0; evaluation
  always calls this with 0 so validation losses are plain cross-entropy.
  """
  labels = batch["labels"]
  mask = batch.get("mask")
  mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  ce = cross_entropy(logits, labels, label_smoothing)
  hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return {"loss": jnp.sum(ce * mask), "correct": jnp.sum(hits * mask), "count": jnp.sum(mask)}


def make_train_step(module, tx, label_smoothing: float, dropout_key: jax.Array):
  """Returns step(state, batch) -> (state, {"loss", "accuracy"}) (pure; jit it over a mesh).

  Dropout at step s uses ``fold_in(dropout_key, s)``, so a resumed run draws the same masks.
  """

  def step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(dropout_key, state.step)
    has_bn = bool(state.batch_stats)

    def loss_fn(params):
      variables = {"params": params}
      if has_bn:
        variables["batch_stats"] = state.batch_stats
        (logits, _), updates = module.apply(variables, batch["inputs"], train=True,
                                            mutable=["batch_stats"], rngs={"dropout": rng})
        new_stats = updates["batch_stats"]
      else:
        logits, _ = module.apply(variables, batch["inputs"], train=True, rngs={"dropout": rng})
        new_stats = state.batch_stats
      sums = loss_sums(logits, batch, label_smoothing)
      count = jnp.maximum(sums["count"], 1.0)
      return sums["loss"] / count, (sums, count, new_stats)

    grads, (sums, count, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state)
    return new_state, {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count}

  return step


def make_eval_step(module):
  """Returns eval(variables, batch) -> masked sums of loss, correct and count."""

  def step(variables, batch):
    logits, _ = module.apply(variables, batch["inputs"], train=False)
    return loss_sums(logits, batch)

  return step
