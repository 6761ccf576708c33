"""ResMem and kNN-LM on top of a trained decoder-only language model.

Per-token memory. Every target token of the training split (each exactly once, see
``resmem_jax.data.text.eval_batches``) is one memory entry: key = the model's final hidden state at
the position that predicts it, value = the residual ``onehot(next token) - softmax(logits / T)``
stored in the memory's sparse top-m format (the label entry plus the m largest probabilities;
a dense vocabulary-sized row per token does not scale).

Predictions for a query position with neighbours ``j = 1..k`` at Euclidean distances ``d_j``,
weights ``w_j = softmax_j(-d_j / sigma)``:

  base     ``p = softmax(logits)`` (the trained model, T = 1)
  ResMem   ``softmax(logits / T) + sum_j w_j r_j``
  kNN-LM   ``lambda * p_knn + (1 - lambda) * softmax(logits / T)``, ``p_knn(v) = sum_j w_j
           [next token of j == v]``, from the same neighbours and weights.

Log loss. ResMem's vector can leave the simplex, so its log loss (and perplexity = exp(log loss))
uses the single project rule ``resmem_jax.metrics.to_distribution``: clip every entry at
``LOG_LOSS_FLOOR`` (1e-6) and renormalise. The base and kNN-LM vectors are distributions; the same
rule is applied to them too (it changes them only where an entry is below the floor).

Hyperparameters k, sigma, T (and lambda for kNN-LM) are chosen on the validation split from one
neighbour query at the largest k: each grid point reuses the first k neighbours. The selection
criterion (``resmem.select_by``) is next-token accuracy (ties: lower log loss, then smaller k) or
log loss; the same one for both methods.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax import mesh as mesh_lib
from resmem_jax import metrics
from resmem_jax import resmem as resmem_math
from resmem_jax.jsonio import write_json_atomic

SELECT_BY = ("accuracy", "log_loss")


# ----------------------------------------------------------------------------- pure math


def sparse_residuals(logits, targets, temperature, top_m: int):
  """Sparse top-m form of ``onehot(targets) - softmax(logits / T)``.

  Returns ``(columns int32 [..., m + 1], values float32 [..., m + 1])``: column 0 is the target
  with value ``1 - p_target``; then the ``m`` largest probabilities of the other tokens with
  values ``-p``. Every other entry of the residual is treated as 0.
  """
  num_classes = logits.shape[-1]
  m = min(int(top_m), num_classes - 1)
  probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  is_target = jax.nn.one_hot(targets, num_classes, dtype=jnp.bool_)
  p_target = jnp.sum(jnp.where(is_target, probs, 0.0), axis=-1, keepdims=True)
  top_p, top_cols = jax.lax.top_k(jnp.where(is_target, -1.0, probs), m)
  columns = jnp.concatenate([targets[..., None].astype(jnp.int32), top_cols.astype(jnp.int32)], -1)
  values = jnp.concatenate([1.0 - p_target, -top_p], axis=-1)
  return columns, values


def scatter_rows(columns, values, num_classes: int):
  """Dense ``[q, C]`` rows from per-row (column, value) pairs ``[q, n]`` (repeats add up)."""
  rows = jnp.broadcast_to(jnp.arange(columns.shape[0])[:, None], columns.shape)
  return jnp.zeros((columns.shape[0], num_classes), jnp.float32).at[rows, columns].add(values)


def knn_distribution(weights, neighbour_targets, num_classes: int):
  """kNN-LM's neighbour distribution: ``p_knn(v) = sum_j w_j [neighbour_targets_j == v]``."""
  return scatter_rows(neighbour_targets, weights, num_classes)


def interpolate(p_knn, p_lm, lam):
  """kNN-LM mixture ``lam * p_knn + (1 - lam) * p_lm``."""
  return lam * p_knn + (1.0 - lam) * p_lm


def _label_log_loss_sum(pred, labels, mask):
  """Sum over unmasked rows of ``-log to_distribution(pred)[label]`` (the project's rule)."""
  probs = metrics.to_distribution(pred)
  picked = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
  return jnp.sum(-jnp.log(picked) * mask)


def _hits_sum(pred, labels, mask):
  return jnp.sum((jnp.argmax(pred, -1) == labels) * mask)


# ----------------------------------------------------------------------------- forward passes


@dataclasses.dataclass
class TokenOutputs:
  """Per target token of one batch (padding dropped), in data order."""
  hidden: np.ndarray    # [n, D] float32: memory key / query
  logits: np.ndarray    # [n, V] float32 (only when asked for)
  targets: np.ndarray   # [n] int32: the next token
  sparse: list          # per temperature: (columns [n, m+1] int32, values [n, m+1] float32)


def make_token_forward(module, temperatures: Sequence[float], top_m: int, with_logits: bool):
  """Jitted ``(variables, inputs, targets) -> (hidden, logits | None, [sparse residual per T])``."""
  temperatures = tuple(float(t) for t in temperatures)

  @jax.jit
  def forward(variables, inputs, targets):
    logits, hidden = module.apply(variables, inputs, train=False)
    logits = logits.astype(jnp.float32)
    sparse = [sparse_residuals(logits, targets, t, top_m) for t in temperatures]
    return hidden.astype(jnp.float32), (logits if with_logits else None), sparse

  return forward


def token_pass(forward, variables, batches: Iterator[dict], mesh,
               max_tokens: int | None = None) -> Iterator[TokenOutputs]:
  """Runs ``forward`` over eval batches; yields the outputs of every real (mask=1) target token."""
  seen = 0
  for batch in batches:
    inputs = mesh_lib.shard_batch(batch["inputs"], mesh)
    targets = mesh_lib.shard_batch(batch["targets"], mesh)
    hidden, logits, sparse = mesh_lib.to_host(forward(variables, inputs, targets))
    mask_np, targets_np = batch["mask"], batch["targets"]
    if jax.process_count() > 1:  # every process gets every row
      mask_np, targets_np = mesh_lib.to_host((mesh_lib.shard_batch(batch["mask"], mesh), targets))
    keep = np.asarray(mask_np).reshape(-1).astype(bool)
    flat = lambda x: None if x is None else np.asarray(x).reshape((-1,) + x.shape[2:])[keep]
    out = TokenOutputs(hidden=flat(hidden), logits=flat(logits),
                       targets=np.asarray(targets_np).reshape(-1)[keep].astype(np.int32),
                       sparse=[(flat(c), flat(v)) for c, v in sparse])
    if max_tokens is not None and seen + len(out.targets) > max_tokens:
      n = max_tokens - seen
      out = TokenOutputs(out.hidden[:n], None if out.logits is None else out.logits[:n],
                         out.targets[:n], [(c[:n], v[:n]) for c, v in out.sparse])
    seen += len(out.targets)
    if len(out.targets):
      yield out
    if max_tokens is not None and seen >= max_tokens:
      return


@dataclasses.dataclass
class TrainTokens:
  """Everything the memory needs about the training tokens, row i = memory entry i."""
  hidden: np.ndarray        # [N, D]
  targets: np.ndarray       # [N]
  temperatures: tuple
  sparse: list              # per temperature: (columns [N, m+1], values [N, m+1])
  num_classes: int

  def dense_residuals(self, temperature: float, rows: slice) -> np.ndarray:
    """Rows of the (sparse-truncated) residual at ``temperature`` as a dense ``[n, V]`` array."""
    columns, values = self.sparse[self.temperatures.index(temperature)]
    return np.asarray(scatter_rows(jnp.asarray(columns[rows]), jnp.asarray(values[rows]),
                                   self.num_classes))


def collect_train_tokens(forward, variables, batches, mesh, temperatures, num_classes) -> TrainTokens:
  hidden, targets, sparse = [], [], [[] for _ in temperatures]
  for out in token_pass(forward, variables, batches, mesh):
    hidden.append(out.hidden)
    targets.append(out.targets)
    for parts, pair in zip(sparse, out.sparse):
      parts.append(pair)
  if not targets:
    raise ValueError("the training split produced no target tokens")
  return TrainTokens(
      hidden=np.concatenate(hidden), targets=np.concatenate(targets),
      temperatures=tuple(float(t) for t in temperatures),
      sparse=[(np.concatenate([c for c, _ in parts]), np.concatenate([v for _, v in parts]))
              for parts in sparse],
      num_classes=int(num_classes))


# ----------------------------------------------------------------------------- memory


def _residual_chunks(train: TrainTokens, temperature: float, max_dense_elements: int):
  """Dense residual rows at ``temperature`` in order, ``max_dense_elements`` floats at a time."""
  n = len(train.targets)
  chunk = n if n * train.num_classes <= max_dense_elements else max(
      1024, max_dense_elements // train.num_classes)
  for start in range(0, n, chunk):
    rows = slice(start, min(n, start + chunk))
    yield rows, train.dense_residuals(temperature, rows)


def build_token_memory(train: TrainTokens, temperature: float, *, backend: str, top_m: int,
                       max_dense_elements: int = 1 << 28, **backend_options):
  """The ResMem memory: one entry per training token, sparse top-m residuals at ``temperature``.

  When ``N * V`` exceeds ``max_dense_elements`` the memory is built from the first chunk and the
  rest is appended with ``Memory.add`` chunk by chunk, so no ``[N, V]`` array exists at once.
  """
  import resmem_jax
  memory = None
  for rows, residual_rows in _residual_chunks(train, temperature, max_dense_elements):
    keys = train.hidden[rows]
    if memory is None:
      memory = resmem_jax.build_memory(keys, residual_rows, backend=backend,
                                       residual_format="sparse", top_m=top_m, **backend_options)
    else:
      memory.add(keys, residual_rows)
  n = len(train.targets)
  if memory.size != n:
    raise RuntimeError(f"memory holds {memory.size} entries for {n} training tokens")
  return memory


def retemper_token_memory(memory, train: TrainTokens, temperature: float,
                          max_dense_elements: int = 1 << 28):
  """The same memory (keys and search index shared) with residuals at another temperature."""
  return memory.with_residuals(
      rows for _, rows in _residual_chunks(train, temperature, max_dense_elements))


# ----------------------------------------------------------------------------- validation sweep


@dataclasses.dataclass
class Choice:
  """One hyperparameter setting and its validation scores."""
  k: int
  sigma: float
  temperature: float
  accuracy: float
  log_loss: float
  knn_lambda: float | None = None


def _check_grid(name: str, values, low=0.0, high=None) -> list:
  values = [float(v) for v in values]
  if not values:
    raise ValueError(f"{name} is empty")
  for v in values:
    if not np.isfinite(v) or v <= low or (high is not None and v > high):
      bound = f"in ({low}, {high}]" if high is not None else f"> {low}"
      raise ValueError(f"{name} values must be finite and {bound}, got {values}")
  return values


def _chunk_scores(k: int, distances, nb_columns, nb_values, nb_targets, logits, labels, mask,
                  temperature, sigmas, lambdas):
  """Hit and log-loss sums of ResMem ([S]) and kNN-LM ([S, L]) for the first k neighbours."""
  q, num_classes = logits.shape
  d = distances[:, :k]
  columns = nb_columns[:, :k].reshape(q, -1)
  values = nb_values[:, :k]
  p = jax.nn.softmax(logits / temperature, axis=-1)

  def per_sigma(sigma):
    w = jax.nn.softmax(-d / sigma, axis=-1)
    resmem = p + scatter_rows(columns, (w[..., None] * values).reshape(q, -1), num_classes)
    p_knn = knn_distribution(w, nb_targets[:, :k], num_classes)

    def per_lambda(lam):
      mix = interpolate(p_knn, p, lam)
      return _hits_sum(mix, labels, mask), _label_log_loss_sum(mix, labels, mask)

    knn_hits, knn_ll = jax.vmap(per_lambda)(lambdas)
    return (_hits_sum(resmem, labels, mask), _label_log_loss_sum(resmem, labels, mask),
            knn_hits, knn_ll)

  return jax.vmap(per_sigma)(sigmas)


_chunk_scores_jit = jax.jit(_chunk_scores, static_argnums=0)


@jax.jit
def _base_sums(logits, labels, mask):
  p = jax.nn.softmax(logits, axis=-1)
  return _hits_sum(p, labels, mask), _label_log_loss_sum(p, labels, mask)


def _padded_chunks(num_rows: int, chunk: int):
  for start in range(0, num_rows, chunk):
    yield start, min(num_rows, start + chunk)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  pad = rows - x.shape[0]
  return x if pad == 0 else np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


class ValidationSweep:
  """Accumulates validation scores of every (k, sigma, T) and (k, sigma, T, lambda)."""

  def __init__(self, train: TrainTokens, k_grid, sigma_grid, temperature_grid, lambda_grid):
    self.train = train
    self.k_grid = sorted({int(k) for k in _check_grid("k_grid", k_grid)})
    self.sigma_grid = _check_grid("sigma_grid", sigma_grid)
    self.temperature_grid = _check_grid("temperature_grid", temperature_grid)
    missing = [t for t in self.temperature_grid if t not in train.temperatures]
    if missing:
      raise ValueError(f"temperature_grid values {missing} have no stored training residuals")
    self.lambda_grid = _check_grid("knn_lambda_grid", lambda_grid, high=1.0)
    shape = (len(self.k_grid), len(self.temperature_grid), len(self.sigma_grid))
    self.resmem = np.zeros(shape + (2,))
    self.knn = np.zeros(shape + (len(self.lambda_grid), 2))
    self.base = np.zeros(2)
    self.count = 0
    num_classes = train.num_classes
    width = len(self.sigma_grid) * (len(self.lambda_grid) + 3) * num_classes
    self.chunk = int(max(8, min(4096, (1 << 24) // width)))

  @property
  def k_max(self) -> int:
    return self.k_grid[-1]

  def add(self, out: TokenOutputs, distances: np.ndarray, indices: np.ndarray) -> None:
    """Scores one batch of validation tokens given their ``k_max`` nearest training tokens."""
    if distances.shape[1] < self.k_max:
      raise ValueError(f"need {self.k_max} neighbours per query, got {distances.shape[1]}")
    sigmas = jnp.asarray(self.sigma_grid, jnp.float32)
    lambdas = jnp.asarray(self.lambda_grid, jnp.float32)
    n = len(out.targets)
    for start, stop in _padded_chunks(n, self.chunk):
      rows = self.chunk
      pad = lambda x: _pad_rows(np.asarray(x), rows)
      mask = pad(np.ones(stop - start, np.float32))
      labels, logits = pad(out.targets[start:stop]), pad(out.logits[start:stop])
      idx = np.asarray(indices[start:stop, :self.k_max])
      dist, nb_targets = pad(distances[start:stop, :self.k_max]), pad(self.train.targets[idx])
      hits, ll = _base_sums(logits, labels, mask)
      self.base += [float(hits), float(ll)]
      for ti, temperature in enumerate(self.temperature_grid):
        columns, values = self.train.sparse[self.train.temperatures.index(temperature)]
        nb_columns, nb_values = pad(columns[idx].astype(np.int32)), pad(values[idx])
        for ki, k in enumerate(self.k_grid):
          r_hits, r_ll, k_hits, k_ll = _chunk_scores_jit(
              k, dist, nb_columns, nb_values, nb_targets, logits, labels, mask,
              jnp.float32(temperature), sigmas, lambdas)
          self.resmem[ki, ti, :, 0] += np.asarray(r_hits)
          self.resmem[ki, ti, :, 1] += np.asarray(r_ll)
          self.knn[ki, ti, :, :, 0] += np.asarray(k_hits)
          self.knn[ki, ti, :, :, 1] += np.asarray(k_ll)
    self.count += n

  def choices(self) -> tuple[list, list]:
    """All grid points as (ResMem choices, kNN-LM choices), scores as means per token."""
    if self.count == 0:
      raise ValueError("the validation sweep saw no tokens")
    res, knn = [], []
    for ki, k in enumerate(self.k_grid):
      for ti, t in enumerate(self.temperature_grid):
        for si, s in enumerate(self.sigma_grid):
          hits, ll = self.resmem[ki, ti, si] / self.count
          res.append(Choice(k, s, t, float(hits), float(ll)))
          for li, lam in enumerate(self.lambda_grid):
            hits, ll = self.knn[ki, ti, si, li] / self.count
            knn.append(Choice(k, s, t, float(hits), float(ll), knn_lambda=lam))
    return res, knn

  def base_scores(self) -> dict:
    return {"accuracy": float(self.base[0] / self.count),
            "log_loss": float(self.base[1] / self.count)}


def select(choices: Sequence[Choice], select_by: str = "accuracy") -> Choice:
  """Best validation setting: by accuracy (ties: log loss, then k) or by log loss (ties: k)."""
  if select_by not in SELECT_BY:
    raise ValueError(f"select_by must be one of {SELECT_BY}, got {select_by!r}")
  if not choices:
    raise ValueError("choices is empty")
  if select_by == "accuracy":
    return min(choices, key=lambda c: (-round(c.accuracy, 9), round(c.log_loss, 9), c.k))
  return min(choices, key=lambda c: (round(c.log_loss, 9), c.k))


# ----------------------------------------------------------------------------- test evaluation


def _gather_dense(memory, indices: np.ndarray, max_elements: int = 1 << 25) -> np.ndarray:
  """``memory.gather_residuals`` in row chunks small enough for a large vocabulary."""
  q, k = indices.shape
  rows = max(1, max_elements // max(1, k * memory.num_outputs))
  return np.concatenate([np.asarray(memory.gather_residuals(indices[s:s + rows]), np.float32)
                         for s in range(0, q, rows)])


@jax.jit
def _test_sums(logits, labels, mask, distances_res, nb_residuals, distances_knn, nb_targets,
               temperature_res, sigma_res, temperature_knn, sigma_knn, lam):
  num_classes = logits.shape[-1]
  base = jax.nn.softmax(logits, axis=-1)
  w_res = resmem_math.neighbour_weights(distances_res, sigma_res)
  resmem = resmem_math.resmem_prediction(jax.nn.softmax(logits / temperature_res, -1), w_res,
                                         nb_residuals)
  w_knn = jax.nn.softmax(-distances_knn / sigma_knn, axis=-1)
  knn = interpolate(knn_distribution(w_knn, nb_targets, num_classes),
                    jax.nn.softmax(logits / temperature_knn, -1), lam)
  return {name: jnp.stack([_hits_sum(pred, labels, mask), _label_log_loss_sum(pred, labels, mask)])
          for name, pred in (("base", base), ("resmem", resmem), ("knnlm", knn))}


def evaluate_split(forward, variables, batches, mesh, memory, train: TrainTokens,
                   res: Choice, knn: Choice, chunk: int = 2048) -> dict:
  """Base / ResMem / kNN-LM accuracy and log loss over every target token of a split.

  One neighbour query per token at ``max(res.k, knn.k)``; both methods use its first k.
  """
  k_query = max(res.k, knn.k)
  totals = {"base": np.zeros(2), "resmem": np.zeros(2), "knnlm": np.zeros(2)}
  count = 0
  for out in token_pass(forward, variables, batches, mesh):
    distances, indices = memory.search(out.hidden, k_query)
    distances, indices = np.asarray(distances, np.float32), np.asarray(indices)
    for start, stop in _padded_chunks(len(out.targets), chunk):
      pad = lambda x: _pad_rows(np.asarray(x), chunk)
      idx = indices[start:stop]
      sums = _test_sums(
          pad(out.logits[start:stop]), pad(out.targets[start:stop]),
          pad(np.ones(stop - start, np.float32)), pad(distances[start:stop, :res.k]),
          pad(_gather_dense(memory, idx[:, :res.k])), pad(distances[start:stop, :knn.k]),
          pad(train.targets[idx[:, :knn.k]]), jnp.float32(res.temperature),
          jnp.float32(res.sigma), jnp.float32(knn.temperature), jnp.float32(knn.sigma),
          jnp.float32(knn.knn_lambda))
      for name, value in sums.items():
        totals[name] += np.asarray(value)
    count += len(out.targets)
  if count == 0:
    raise ValueError("the evaluated split has no target tokens")
  return {name: {"accuracy": float(v[0] / count), "log_loss": float(v[1] / count),
                 "perplexity": float(np.exp(v[1] / count))} for name, v in totals.items()} | {
                     "num_tokens": count}


# ----------------------------------------------------------------------------- the pipeline


def _grid(cfg, fixed: str, grid: str):
  value = cfg.get(fixed)
  return [value] if value is not None else list(cfg.get(grid))


def run(config, workdir) -> dict:
  """Train (or resume) the LM, build the per-token memory, tune on validation, score test.

  Writes ``WORKDIR/results.json`` with ``base``, ``resmem``, ``knnlm`` (each ``test_accuracy``,
  ``test_log_loss``, ``test_perplexity``, ``validation_*``) and ``hparams``, and returns it.
  """
  from resmem_jax import data as data_lib
  from resmem_jax import models
  from resmem_jax import train as train_lib

  if config.get("task") != "lm":
    raise ValueError(f"config.task must be 'lm' for the language-model pipeline, got "
                     f"{config.get('task')!r}")
  workdir = pathlib.Path(workdir)
  rcfg = config.resmem
  select_by = rcfg.get("select_by", "accuracy")
  if select_by not in SELECT_BY:
    raise ValueError(f"config.resmem.select_by must be one of {SELECT_BY}, got {select_by!r}")
  timings = {}

  start = time.perf_counter()
  train_metrics = train_lib.train_and_evaluate(config, workdir)
  timings["train_s"] = time.perf_counter() - start
  module, variables, step = train_lib.restore_model(config, workdir)
  num_params = models.count_params(variables)

  mesh = mesh_lib.data_mesh()
  variables = mesh_lib.replicate(variables, mesh)
  batch_size = mesh_lib.pad_to_multiple(int(rcfg.get("eval_batch_size", 64)),
                                        mesh_lib.num_data_shards(mesh))
  k_grid = [int(k) for k in _grid(rcfg, "k", "k_grid")]
  sigma_grid = _grid(rcfg, "sigma", "sigma_grid")
  temperature_grid = [float(t) for t in _grid(rcfg, "temperature", "temperature_grid")]
  lambda_grid = _grid(rcfg, "knn_lambda", "knn_lambda_grid")
  top_m = int(rcfg.top_m)
  backend = rcfg.get("backend", "exact")
  num_classes = data_lib.dataset_info(config.data).num_classes

  start = time.perf_counter()
  train_forward = make_token_forward(module, temperature_grid, top_m, with_logits=False)
  train_tokens = collect_train_tokens(
      train_forward, variables, data_lib.eval_batches(config.data, "train", batch_size), mesh,
      temperature_grid, num_classes)
  timings["train_pass_s"] = time.perf_counter() - start
  logging.info("%d training tokens, hidden size %d", len(train_tokens.targets),
               train_tokens.hidden.shape[1])

  start = time.perf_counter()
  memory = build_token_memory(train_tokens, temperature_grid[0], backend=backend, top_m=top_m)
  timings["memory_build_s"] = time.perf_counter() - start

  start = time.perf_counter()
  sweep = ValidationSweep(train_tokens, k_grid, sigma_grid, temperature_grid, lambda_grid)
  eval_forward = make_token_forward(module, (), top_m, with_logits=True)
  max_val = rcfg.get("max_validation_tokens")
  for out in token_pass(eval_forward, variables,
                        data_lib.eval_batches(config.data, "validation", batch_size), mesh,
                        max_tokens=max_val):
    distances, indices = memory.search(out.hidden, sweep.k_max)
    sweep.add(out, np.asarray(distances, np.float32), np.asarray(indices))
  res_choices, knn_choices = sweep.choices()
  best_res, best_knn = select(res_choices, select_by), select(knn_choices, select_by)
  timings["validation_sweep_s"] = time.perf_counter() - start
  logging.info("validation: ResMem %s, kNN-LM %s", best_res, best_knn)

  if best_res.temperature != temperature_grid[0]:
    start = time.perf_counter()
    memory = retemper_token_memory(memory, train_tokens, best_res.temperature)
    timings["memory_build_s"] += time.perf_counter() - start

  start = time.perf_counter()
  test = evaluate_split(eval_forward, variables,
                        data_lib.eval_batches(config.data, "test", batch_size), mesh, memory,
                        train_tokens, best_res, best_knn)
  timings["test_s"] = time.perf_counter() - start

  val_base = sweep.base_scores()
  val = {"base": val_base,
         "resmem": {"accuracy": best_res.accuracy, "log_loss": best_res.log_loss},
         "knnlm": {"accuracy": best_knn.accuracy, "log_loss": best_knn.log_loss}}
  results = {
      name: {"test_accuracy": test[name]["accuracy"], "test_log_loss": test[name]["log_loss"],
             "test_perplexity": test[name]["perplexity"],
             "validation_accuracy": val[name]["accuracy"],
             "validation_log_loss": val[name]["log_loss"]}
      for name in ("base", "resmem", "knnlm")}
  results["hparams"] = {
      "select_by": select_by,
      "resmem": {"k": best_res.k, "sigma": best_res.sigma, "temperature": best_res.temperature},
      "knnlm": {"k": best_knn.k, "sigma": best_knn.sigma, "temperature": best_knn.temperature,
                "lambda": best_knn.knn_lambda}}
  results["log_loss_rule"] = (f"-log of the target entry of to_distribution(pred): clip at "
                              f"{metrics.LOG_LOSS_FLOOR:g}, renormalise")
  results["memory"] = {"entries": int(memory.size), "train_tokens": len(train_tokens.targets),
                       "key_dim": int(train_tokens.hidden.shape[1]), "backend": backend,
                       "residual_format": "sparse", "top_m": top_m}
  results["model"] = {"name": config.model.name, "num_params": int(num_params),
                      "step": int(step), **{k: v for k, v in train_metrics.items()
                                            if isinstance(v, (int, float))}}
  results["num_test_tokens"] = test["num_tokens"]
  results["num_validation_tokens"] = sweep.count
  results["timings_s"] = timings
  if jax.process_index() == 0:
    write_json_atomic(workdir / "results.json", results)
  return results


def format_table(results: dict) -> str:
  """A plain-text table of the test (and validation) numbers in ``results``."""
  lines = [f"{'method':8s} {'test acc':>9s} {'test logloss':>13s} {'test ppl':>9s} "
           f"{'val acc':>8s} {'val logloss':>12s}"]
  for name in ("base", "resmem", "knnlm"):
    r = results[name]
    lines.append(f"{name:8s} {r['test_accuracy']:9.4f} {r['test_log_loss']:13.4f} "
                 f"{r['test_perplexity']:9.3f} {r['validation_accuracy']:8.4f} "
                 f"{r['validation_log_loss']:12.4f}")
  h = results["hparams"]
  lines.append(f"ResMem: k={h['resmem']['k']} sigma={h['resmem']['sigma']:g} "
               f"T={h['resmem']['temperature']:g} | kNN-LM: k={h['knnlm']['k']} "
               f"sigma={h['knnlm']['sigma']:g} T={h['knnlm']['temperature']:g} "
               f"lambda={h['knnlm']['lambda']:g} (chosen by validation {h['select_by']})")
  m = results["model"]
  lines.append(f"model: {m['name']} with {m['num_params']:,} parameters; memory: "
               f"{results['memory']['entries']:,} entries (one per training token)")
  return "\n".join(lines)
