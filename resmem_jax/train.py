"""Data-parallel training of ResMem's base network with Orbax checkpoints.

``train_and_evaluate(config, workdir)`` trains the model named by ``config.model`` on
``config.data`` and writes:

  WORKDIR/checkpoints/   Orbax checkpoints (periodic + final); a rerun resumes from the latest
  WORKDIR/metrics.jsonl  one JSON record per log / evaluation event
  WORKDIR/tensorboard/   TensorBoard summaries (tensorboardX)
  WORKDIR/model_info.json  what ``restore_model`` needs to rebuild the module without the data

One code path serves one CPU, several GPUs and multi-host TPU slices: a 1-D ``data`` mesh over all
devices, the batch split along it and the train state replicated. Runs are deterministic for a
seed: parameter init and dropout keys derive from ``config.seed`` and the step number, and the
input iterator is restarted at the resumed step, so a killed and rerun job ends with the same
parameters and metrics as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from resmem_jax import mesh as mesh_lib
from resmem_jax import models

TASKS = ("classification", "lm")


# ----------------------------------------------------------------------------- state / optimiser


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training (the module and optimiser are kept outside)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  def variables(self) -> dict:
    """The flax variables dict for ``module.apply``."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


def make_schedule(train_cfg, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Learning rate per step: linear warm-up from 0, then cosine to 0, step drops, or constant."""
  base_lr = float(train_cfg.learning_rate)
  warmup = int(round(float(train_cfg.get("warmup_epochs", 0.0)) * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  kind = train_cfg.get("schedule", "cosine")
  if kind == "cosine":
    if warmup == 0:
      return optax.cosine_decay_schedule(base_lr, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup, max(total_steps, warmup + 1),
                                              end_value=0.0)
  if kind == "step":
    factor = float(train_cfg.get("step_factor", 0.1))
    boundaries = {int(round(frac * total_steps)) - warmup: factor
                  for frac in train_cfg.get("step_boundaries", (0.5, 0.75))}
    main = optax.piecewise_constant_schedule(base_lr, boundaries)
  elif kind == "constant":
    main = optax.constant_schedule(base_lr)
  else:
    raise ValueError(f"train.schedule must be 'cosine', 'step' or 'constant', got {kind!r}")
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(0.0, base_lr, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def _kernel_mask(params):
  """Weight decay applies to matrices / conv kernels, not to biases or norm scales."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(train_cfg, steps_per_epoch: int, total_steps: int):
  """optax SGD (momentum, optional Nesterov), Adam or AdamW, with weight decay and schedule."""
  schedule = make_schedule(train_cfg, steps_per_epoch, total_steps)
  name = train_cfg.get("optimizer", "sgd")
  wd = float(train_cfg.get("weight_decay", 0.0))
  parts = []
  clip = float(train_cfg.get("grad_clip_norm", 0.0) or 0.0)
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  if name == "sgd":
    if wd:
      parts.append(optax.add_decayed_weights(wd, mask=_kernel_mask))
    parts.append(optax.sgd(schedule, momentum=float(train_cfg.get("momentum", 0.9)) or None,
                           nesterov=bool(train_cfg.get("nesterov", False))))
  elif name == "adam":  # L2 regularisation added to the gradient (coupled)
    if wd:
      parts.append(optax.add_decayed_weights(wd, mask=_kernel_mask))
    parts.append(optax.adam(schedule, b1=float(train_cfg.get("b1", 0.9)),
                            b2=float(train_cfg.get("b2", 0.999))))
  elif name == "adamw":  # decoupled weight decay
    parts.append(optax.adamw(schedule, b1=float(train_cfg.get("b1", 0.9)),
                             b2=float(train_cfg.get("b2", 0.999)), weight_decay=wd,
                             mask=_kernel_mask))
  else:
    raise ValueError(f"train.optimizer must be 'sgd', 'adam' or 'adamw', got {name!r}")
  return optax.chain(*parts)


# ----------------------------------------------------------------------------- losses


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-position softmax cross-entropy of integer ``labels`` [...] under ``logits`` [..., C]."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def batch_inputs(task: str, batch: dict) -> jax.Array:
  return batch["image"] if task == "classification" else batch["inputs"]


def batch_labels_and_mask(task: str, batch: dict):
  """(labels, float mask) with the same shape: [b] for classification, [b, L] for lm."""
  if task == "classification":
    labels = batch["label"]
  else:
    labels = batch["targets"]
  mask = batch.get("mask")
  mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  return labels, mask


def loss_sums(task: str, logits, batch, label_smoothing: float = 0.0) -> dict:
  """Masked sums: {"loss": sum of CE, "correct": sum of hits, "count": number of targets}.

  The reported loss excludes label smoothing only when ``label_smoothing`` is 0; evaluation
  always calls this with 0 so validation losses are plain cross-entropy.
  """
  labels, mask = batch_labels_and_mask(task, batch)
  ce = cross_entropy(logits, labels, label_smoothing)
  hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return {"loss": jnp.sum(ce * mask), "correct": jnp.sum(hits * mask), "count": jnp.sum(mask)}


# ----------------------------------------------------------------------------- step functions


def _needed_keys(task: str, with_mask: bool):
  keys = ("image", "label") if task == "classification" else ("inputs", "targets")
  return keys + (("mask",) if with_mask else ())


def make_train_step(module, tx, task: str, label_smoothing: float, dropout_key: jax.Array):
  """Returns step(state, batch) -> (state, {"loss", "accuracy"}) (pure; jit it over a mesh)."""

  def step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(dropout_key, state.step)
    has_bn = bool(state.batch_stats)

    def loss_fn(params):
      variables = {"params": params}
      if has_bn:
        variables["batch_stats"] = state.batch_stats
        (logits, _), updates = module.apply(variables, batch_inputs(task, batch), train=True,
                                            mutable=["batch_stats"], rngs={"dropout": rng})
        new_stats = updates["batch_stats"]
      else:
        logits, _ = module.apply(variables, batch_inputs(task, batch), train=True,
                                 rngs={"dropout": rng})
        new_stats = state.batch_stats
      sums = loss_sums(task, logits, batch, label_smoothing)
      count = jnp.maximum(sums["count"], 1.0)
      return sums["loss"] / count, (sums, count, new_stats)

    grads, (sums, count, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state)
    return new_state, {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count}

  return step


def make_eval_step(module, task: str):
  """Returns eval(variables, batch) -> masked sums of loss, correct and count."""

  def step(variables, batch):
    logits, _ = module.apply(variables, batch_inputs(task, batch), train=False)
    return loss_sums(task, logits, batch)

  return step


# ----------------------------------------------------------------------------- helpers


def _validate_config(config) -> None:
  task = config.get("task", "classification")
  if task not in TASKS:
    raise ValueError(f"config.task must be one of {TASKS}, got {task!r}")
  if int(config.train.batch_size) < 1:
    raise ValueError(f"config.train.batch_size must be positive, got {config.train.batch_size}")
  if int(config.train.num_steps) <= 0 and float(config.train.num_epochs) <= 0:
    raise ValueError("config.train.num_epochs (or config.train.num_steps) must be positive")


def _data_module():
  from resmem_jax import data  # imported lazily: pulls in TFDS / TensorFlow
  return data


def _sample_input(task: str, info) -> np.ndarray:
  shape = (1,) + tuple(info.input_shape)
  return np.zeros(shape, np.float32 if task == "classification" else np.int32)


def _schedule_lengths(config, split_sizes):
  """(steps per epoch, total steps); the training split is counted only when epochs matter.

  With ``num_steps`` set, no warm-up in epochs and a step interval for evaluation, an epoch's
  length is never used, and counting it would mean one pass over the whole training split (for
  lm1b / C4, all of it tokenized): steps per epoch is then 0 (unknown).
  """
  train = config.train
  needs_epoch = (int(train.num_steps) <= 0 or float(train.get("warmup_epochs", 0.0)) > 0
                 or not int(train.get("eval_every_steps", 0)))
  steps_per_epoch = max(1, split_sizes["train"] // int(train.batch_size)) if needs_epoch else 0
  if int(train.num_steps) > 0:
    total = int(train.num_steps)
  else:
    total = max(1, int(math.ceil(float(train.num_epochs) * steps_per_epoch)))
  return steps_per_epoch, total


# Parameter init runs once and is dominated by LLVM compiling one random-number kernel per
# parameter shape (about 4 s per truncated-normal kernel on a loaded 2-core CPU); compiling it
# unoptimised cuts that ~10x at no cost that matters.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_variables(module, sample, key, out_shardings=None):
  """``module.init`` compiled cheaply; returns the flax variables dict (eval mode)."""
  def init(key):
    return module.init({"params": key, "dropout": key}, sample, train=False)
  lowered = jax.jit(init, out_shardings=out_shardings).lower(key)
  return lowered.compile(compiler_options=_INIT_COMPILER_OPTIONS)(key)


def init_state(module, tx, sample: np.ndarray, seed: int, mesh) -> TrainState:
  """Initialises parameters and optimiser state (replicated over ``mesh``) from ``seed``."""
  init_key = jax.random.fold_in(jax.random.key(seed), 0)
  replicated = mesh_lib.replicated(mesh)
  variables = init_variables(module, sample, init_key, out_shardings=replicated)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                    batch_stats=batch_stats, opt_state=opt_state)


def _checkpoint_items(state: TrainState) -> dict:
  variables = state.variables()
  return {"variables": variables, "opt": {"step": state.step, "opt_state": state.opt_state}}


def _checkpoint_manager(workdir: pathlib.Path, max_to_keep: int):
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


def _save(manager, state: TrainState, force: bool = False) -> None:
  import orbax.checkpoint as ocp
  items = _checkpoint_items(state)
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(
      variables=ocp.args.StandardSave(items["variables"]),
      opt=ocp.args.StandardSave(items["opt"])), force=force)


def _restore(manager, step: int, template: TrainState) -> TrainState:
  import orbax.checkpoint as ocp
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _checkpoint_items(template))
  restored = manager.restore(step, args=ocp.args.Composite(
      variables=ocp.args.StandardRestore(abstract["variables"]),
      opt=ocp.args.StandardRestore(abstract["opt"])))
  variables, opt = restored["variables"], restored["opt"]
  return template.replace(step=opt["step"], params=variables["params"],
                          batch_stats=variables.get("batch_stats", template.batch_stats),
                          opt_state=opt["opt_state"])


class _MetricWriter:
  """Writes records to metrics.jsonl and TensorBoard on process 0 only."""

  def __init__(self, workdir: pathlib.Path, resume_step: int | None):
    self.active = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self.tb = None
    if not self.active:
      return
    if resume_step is not None and self.path.exists():
      # Drop what was written after the checkpoint we resume from, so the file ends up exactly
      # as an uninterrupted run's.
      kept = []
      for line in self.path.read_text().splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut off by the kill
        if record.get("step", 0) <= resume_step and not record.get("final"):
          kept.append(line)
      self.path.write_text("".join(k + "\n" for k in kept))
    elif self.path.exists():
      self.path.unlink()
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, record: dict, final: bool = False) -> None:
    if not self.active:
      return
    full = {"step": int(step), **{k: float(v) for k, v in record.items()}}
    if final:
      full["final"] = True
    with self.path.open("a") as f:
      f.write(json.dumps(full) + "\n")
    for key, value in record.items():
      self.tb.add_scalar(key, float(value), int(step))
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _final_record(workdir: pathlib.Path) -> dict | None:
  """The final metrics of a finished run from metrics.jsonl, or None."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return None
  for line in reversed(path.read_text().splitlines()):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record.get("final"):
      record.pop("final")
      record["step"] = int(record["step"])
      record["num_params"] = int(record["num_params"])
      return record
  return None


def evaluate(eval_fn: Callable, variables, batches: Iterator[dict], task: str, mesh) -> dict:
  """Masked mean loss and accuracy over a finite iterator of (padded) batches."""
  keys = _needed_keys(task, with_mask=True)
  totals = None
  for batch in batches:
    batch = mesh_lib.shard_batch({k: batch[k] for k in keys if k in batch}, mesh)
    sums = eval_fn(variables, batch)
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  if totals is None:
    return {"loss": float("nan"), "accuracy": float("nan"), "count": 0.0}
  totals = mesh_lib.to_host(totals)
  count = float(totals["count"])
  return {"loss": float(totals["loss"]) / max(count, 1.0),
          "accuracy": float(totals["correct"]) / max(count, 1.0), "count": count}


# ----------------------------------------------------------------------------- main entry points


def train_and_evaluate(config, workdir) -> dict:
  """Trains (resuming from WORKDIR/checkpoints if present) and returns the final metrics.

  Returns a dict with ``step``, ``num_params``, ``train_loss``, ``train_accuracy`` (mean over
  the last logging window) and ``validation_*`` / ``test_*`` loss and accuracy when those
  splits exist.
  """
  _validate_config(config)
  mesh_lib.initialize_distributed(config.train.get("distributed"))
  task = config.get("task", "classification")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data = _data_module()
  info = data.dataset_info(config.data)

  mesh = mesh_lib.data_mesh()
  multiple = mesh_lib.num_data_shards(mesh)
  batch_size = int(config.train.batch_size)
  if batch_size % multiple:
    raise ValueError(f"config.train.batch_size={batch_size} must be a multiple of the "
                     f"{multiple} devices")
  eval_batch_size = mesh_lib.pad_to_multiple(int(config.train.get("eval_batch_size", batch_size)),
                                             multiple)
  steps_per_epoch, total_steps = _schedule_lengths(config, info.split_sizes)

  dtype = models.compute_dtype(config.train.get("dtype", "float32"))
  module = models.build_model(config.model, info.num_classes, dtype=dtype)
  tx = make_optimizer(config.train, steps_per_epoch, total_steps)
  state = init_state(module, tx, _sample_input(task, info), int(config.seed), mesh)
  num_params = models.count_params(state.params)
  if jax.process_index() == 0:
    (workdir / "model_info.json").write_text(json.dumps(
        {"num_classes": int(info.num_classes), "input_shape": list(info.input_shape),
         "num_params": num_params, "task": task}))

  manager = _checkpoint_manager(workdir, int(config.train.get("max_checkpoints_to_keep", 3)))
  latest = manager.latest_step()
  if latest == total_steps:
    finished = _final_record(workdir)
    if finished is not None:  # a finished run: nothing to train or evaluate again
      manager.close()
      return finished
  if latest is not None:
    state = _restore(manager, latest, state)
    logging.info("Resumed from %s at step %d", workdir / "checkpoints", latest)
  start_step = int(jax.device_get(state.step))
  writer = _MetricWriter(workdir, latest)
  logging.info("%s: %d params, %d steps (%s per epoch), batch %d over %d devices",
               config.model.name, num_params, total_steps, steps_per_epoch or "not counted",
               batch_size, multiple)

  dropout_key = jax.random.fold_in(jax.random.key(int(config.seed)), 1)
  replicated = mesh_lib.replicated(mesh)
  train_step = jax.jit(
      make_train_step(module, tx, task, float(config.train.get("label_smoothing", 0.0)),
                      dropout_key),
      out_shardings=(replicated, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(module, task), out_shardings=replicated)

  def run_eval(split):
    return evaluate(eval_step, state.variables(),
                    data.eval_batches(config.data, split, eval_batch_size), task, mesh)

  has_validation = info.split_sizes.get("validation", 0) > 0
  log_every = max(1, int(config.train.get("log_every_steps", 50)))
  eval_every = int(config.train.get("eval_every_steps", 0)) or steps_per_epoch
  ckpt_every = max(1, int(config.train.get("checkpoint_every_steps", 500)))
  keys = _needed_keys(task, with_mask=(task == "lm"))

  from tqdm import tqdm
  show_bar = jax.process_index() == 0 and sys.stderr.isatty()
  bar = tqdm(total=total_steps, initial=start_step, disable=not show_bar, desc="train")
  batches = data.train_batches(config.data, batch_size, int(config.seed), start_step=start_step)
  window, window_start, last_train = [], time.perf_counter(), {}
  for step in range(start_step, total_steps):
    batch = next(batches)
    batch = mesh_lib.shard_batch({k: batch[k] for k in keys}, mesh)
    state, step_metrics = train_step(state, batch)
    window.append(step_metrics)
    done = step + 1
    bar.update(1)
    if done % log_every == 0 or done == total_steps:
      host = mesh_lib.to_host(window)
      elapsed = time.perf_counter() - window_start
      last_train = {"train_loss": float(np.mean([m["loss"] for m in host])),
                    "train_accuracy": float(np.mean([m["accuracy"] for m in host]))}
      writer.write(done, {**last_train, "learning_rate": float(
          make_schedule(config.train, steps_per_epoch, total_steps)(step))})
      logging.info("step %d/%d: train loss %.4f acc %.4f (%.1f steps/s)", done, total_steps,
                   last_train["train_loss"], last_train["train_accuracy"], len(window) / elapsed)
      bar.set_postfix(loss=f"{last_train['train_loss']:.4f}")
      window, window_start = [], time.perf_counter()
    if has_validation and (done % eval_every == 0 or done == total_steps):
      result = run_eval("validation")
      writer.write(done, {"validation_loss": result["loss"],
                          "validation_accuracy": result["accuracy"]})
      logging.info("step %d: validation loss %.4f acc %.4f", done, result["loss"],
                   result["accuracy"])
    if done % ckpt_every == 0 or done == total_steps:
      _save(manager, state, force=done == total_steps)
  bar.close()
  manager.wait_until_finished()
  manager.close()

  final = {"step": total_steps, "num_params": num_params, **last_train}
  splits = ["validation"] if has_validation else []
  if config.train.get("eval_test_at_end", True) and info.split_sizes.get("test", 0) > 0:
    splits.append("test")
  for split in splits:
    result = run_eval(split)
    final[f"{split}_loss"], final[f"{split}_accuracy"] = result["loss"], result["accuracy"]
  writer.write(total_steps, {k: v for k, v in final.items() if k not in ("step",)}, final=True)
  writer.close()
  logging.info("final: %s", final)
  return final


def restore_model(config, workdir):
  """Rebuilds the module and loads its latest checkpointed variables.

  Returns ``(module, variables, step)``; ``variables`` holds ``params`` (and ``batch_stats``
  for batch-norm models), ready for ``module.apply(variables, x, train=False)``. Raises
  FileNotFoundError when WORKDIR/checkpoints holds no checkpoint.
  """
  workdir = pathlib.Path(workdir)
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"workdir has no checkpoints: {ckpt_dir} does not exist; "
                            "train first with experiments/train.py --workdir")
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(ckpt_dir.absolute())
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise FileNotFoundError(f"workdir has no checkpoints: {ckpt_dir} is empty")
  info_path = workdir / "model_info.json"
  if info_path.exists():
    num_classes = json.loads(info_path.read_text())["num_classes"]
  else:
    num_classes = _data_module().dataset_info(config.data).num_classes
  dtype = models.compute_dtype(config.train.get("dtype", "float32"))
  module = models.build_model(config.model, num_classes, dtype=dtype)
  restored = manager.restore(step, args=ocp.args.Composite(variables=ocp.args.StandardRestore()))
  manager.close()
  variables = jax.tree_util.tree_map(jnp.asarray, dict(restored["variables"]))
  return module, variables, int(step)


# ----------------------------------------------------------------------------- benchmark


def forward_matmul_flops(fn: Callable, *args) -> int:
  """Analytic FLOPs (2 x multiply-adds) of the convolutions and dot products in ``fn(*args)``.

  Walks the jaxpr, so it counts exactly the contractions the model performs (elementwise ops,
  batch norm and pooling, a few percent for ResNets, are left out).
  """
  def walk(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "conv_general_dilated":
        out = eqn.outvars[0].aval.shape
        rhs = eqn.invars[1].aval.shape
        dims = eqn.params["dimension_numbers"]
        out_feature_dim = dims.rhs_spec[0]
        per_output = int(np.prod(rhs)) // rhs[out_feature_dim]  # kh * kw * in_channels/groups
        total += 2 * int(np.prod(out)) * per_output
      elif name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        contracted = int(np.prod([lhs[d] for d in lhs_contract]))
        total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * contracted
      for sub in jax.core.jaxprs_in_params(eqn.params):
        total += walk(sub)
    return total
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def _time_calls(fn, args, repeats: int) -> float:
  """Seconds per call: the fastest of ``repeats`` timed calls after one warm-up call.

  The minimum, not the mean, because on a shared machine other processes only ever add time.
  """
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.min(times))


def matmul_flops_per_second(n: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of an n x n x n float32 matmul: the practical peak of the machine."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  seconds = _time_calls(jax.jit(jnp.matmul), (a, b), repeats)
  return 2.0 * n ** 3 / seconds


def benchmark_train_step(batch_size: int = 128, depth: int = 20, dtype: str = "float32",
                         steps: int = 10, matmul_size: int = 2048,
                         conv_impl: str = "xla") -> dict:
  """Images/s and FLOP/s of the CIFAR ResNet training step on the default device(s)."""
  import ml_collections
  model_cfg = ml_collections.ConfigDict({"name": "cifar_resnet", "depth": depth, "width": 1.0,
                                         "conv_impl": conv_impl})
  module = models.build_model(model_cfg, 10, dtype=dtype)
  mesh = mesh_lib.data_mesh()
  train_cfg = ml_collections.ConfigDict({"learning_rate": 0.1, "momentum": 0.9,
                                         "weight_decay": 1e-4, "schedule": "cosine"})
  tx = make_optimizer(train_cfg, 100, 10_000)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 10, batch_size).astype(np.int32)}
  state = init_state(module, tx, batch["image"][:1], 0, mesh)
  batch = mesh_lib.shard_batch(batch, mesh)
  replicated = mesh_lib.replicated(mesh)
  step = jax.jit(make_train_step(module, tx, "classification", 0.0, jax.random.key(0)),
                 out_shardings=(replicated, replicated), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan")))
  # Model FLOPs, counted on the native-conv form so they do not depend on conv_impl.
  reference = models.build_model(ml_collections.ConfigDict({**model_cfg.to_dict(),
                                                            "conv_impl": "xla"}), 10)
  forward = forward_matmul_flops(
      lambda v, x: reference.apply(v, x, train=False), state.variables(), batch["image"])
  analytic_flops = 3.0 * forward  # backward = grad wrt activations + grad wrt weights

  # The hardware limit: a large float32 matmul, and one in the compute dtype when that differs.
  matmul_dtypes = ["float32"] + ([dtype] if dtype != "float32" else [])
  operands = {d: (jax.random.normal(jax.random.key(0), (matmul_size,) * 2, models.compute_dtype(d)),
                  jax.random.normal(jax.random.key(1), (matmul_size,) * 2, models.compute_dtype(d)))
              for d in matmul_dtypes}
  matmul = jax.jit(jnp.matmul)
  for a, b in operands.values():
    jax.block_until_ready(matmul(a, b))
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  # Step and matmul timings are interleaved so both see the same load from other processes;
  # the fastest of each is kept, since other processes only ever add time.
  step_times, matmul_times = [], {d: [] for d in matmul_dtypes}
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_times.append(time.perf_counter() - start)
    for d, (a, b) in operands.items():
      for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        matmul_times[d].append(time.perf_counter() - start)
  seconds = float(np.min(step_times))
  peaks = {d: 2.0 * matmul_size ** 3 / float(np.min(t)) for d, t in matmul_times.items()}
  peak = peaks["float32"]
  return {
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "model": f"cifar_resnet{depth}", "batch_size": batch_size, "dtype": dtype,
      "conv_impl": module.conv_impl,
      "step_ms": 1e3 * seconds, "images_per_s": batch_size / seconds,
      "xla_flops_per_step": xla_flops, "analytic_flops_per_step": analytic_flops,
      "achieved_tflops_xla": xla_flops / seconds / 1e12,
      "achieved_tflops_analytic": analytic_flops / seconds / 1e12,
      "matmul_tflops": peak / 1e12,
      "fraction_of_matmul_xla": xla_flops / seconds / peak,
      "fraction_of_matmul_analytic": analytic_flops / seconds / peak,
      **{f"{d}_matmul_tflops": p / 1e12 for d, p in peaks.items() if d != "float32"},
      **{f"fraction_of_{d}_matmul_xla": xla_flops / seconds / p
         for d, p in peaks.items() if d != "float32"},
  }
