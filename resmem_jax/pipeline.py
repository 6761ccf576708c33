"""The main job: a trained base model, its residual memory, and test risk for both side by side.

    results = resmem_jax.pipeline.run(config, workdir)

1. Train the base model into ``workdir`` (or resume / reuse the finished checkpoint there).
2. One embedding pass per split (train, validation, test): logits + embeddings of every example
   exactly once. Train and validation outputs are cached in ``workdir/embeddings`` by checkpoint step.
3. Choose k, sigma, T on the validation split (one neighbour query at the largest k, see
   ``resmem_jax.hparams``) unless the config fixes all three.
4. Build the memory on the training split with the chosen T and save it to ``workdir/memory``
   (reused on a rerun when the checkpoint, data and memory settings are unchanged).
5. Evaluate base and ResMem on test and train; time ResMem's prediction against the base forward
   pass; write ``workdir/results.json`` and print a table.

The base model is reported as trained (``softmax(z)``, T = 1); ResMem is
``softmax(z / T) + sum_i w_i r_i`` with the validation-chosen T.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import pathlib
import tempfile
import time
from typing import Any

import jax
import numpy as np

from resmem_jax import embed as embed_lib
from resmem_jax import hparams as hparams_lib
from resmem_jax.jsonio import write_json_atomic
from resmem_jax import mesh as mesh_lib
from resmem_jax import metrics

SPLITS = ("train", "validation", "test")


def _softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  z = logits.astype(np.float64) / temperature
  z -= z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _report(pred: np.ndarray, labels: np.ndarray) -> dict:
  return {k: float(v) for k, v in metrics.classification_report(pred, labels).items()}


def _trained_model(config, workdir: pathlib.Path):
  """(module, variables, step): trains first when ``workdir`` has no finished training run."""
  from resmem_jax import train as train_lib
  # train_and_evaluate resumes from the latest checkpoint and returns at once when it is final.
  train_lib.train_and_evaluate(config, str(workdir))
  return train_lib.restore_model(config, str(workdir))


def _data_signature(config, step: int) -> dict:
  d = config.data
  return {"dataset": str(d.name), "val_fraction": float(d.get("val_fraction", 0.0)),
          "train_fraction": float(d.get("train_fraction", 1.0)), "seed": int(config.get("seed", 0)),
          "checkpoint_step": int(step)}


def _cached_split(cache_dir: pathlib.Path, split: str, signature: dict, compute) -> embed_lib.SplitOutputs:
  path = cache_dir / f"{split}.npz"
  meta_path = cache_dir / f"{split}.json"
  if path.exists() and meta_path.exists():
    try:
      if json.loads(meta_path.read_text()) == signature:
        with np.load(path) as f:
          return embed_lib.SplitOutputs(f["logits"], f["embeddings"], f["labels"])
    except (OSError, ValueError, KeyError) as e:  # corrupt cache: recompute, never trust it
      logging.warning("ignoring unreadable embedding cache %s: %s", path, e)
  out = compute()
  if jax.process_index() == 0:
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
      np.savez(f, logits=out.logits, embeddings=out.embeddings, labels=out.labels)
    os.replace(tmp, path)
    write_json_atomic(meta_path, signature)
  return out


def choose_hparams(rcfg, train_out, val_out, search_memory) -> tuple[dict, list]:
  """(chosen {k, sigma, temperature}, grid results) from one validation query at the largest k."""
  k_grid = [int(k) for k in rcfg.k_grid if int(k) <= train_out.size]
  if not k_grid:
    raise ValueError(f"resmem.k_grid {tuple(rcfg.k_grid)} has no k <= the {train_out.size} "
                     "training examples in the memory")
  distances, indices = search_memory.search(val_out.embeddings, max(k_grid))
  distances, indices = np.asarray(distances), np.asarray(indices)
  sigma_grid = [float(s) for s in rcfg.sigma_grid]
  scale = 1.0
  if rcfg.get("sigma_relative", True):
    # Embedding distances have no natural unit: grid values are multiples of the median distance
    # from a validation point to its nearest training point.
    scale = float(np.median(distances[:, 0]))
    if not np.isfinite(scale) or scale <= 0:
      scale = float(np.median(distances[distances > 0])) if np.any(distances > 0) else 1.0
    sigma_grid = [s * scale for s in sigma_grid]
  temperature_grid = ([float(rcfg.temperature)] if rcfg.get("temperature") is not None
                      else [float(t) for t in rcfg.temperature_grid])
  if rcfg.get("k") is not None:
    k_grid = [int(rcfg.k)]
  if rcfg.get("sigma") is not None:
    sigma_grid = [float(rcfg.sigma)]
  points = hparams_lib.sweep(distances, indices, train_out.logits, train_out.labels,
                             val_out.logits, val_out.labels, k_grid=k_grid, sigma_grid=sigma_grid,
                             temperature_grid=temperature_grid)
  chosen = hparams_lib.best(points, by=str(rcfg.get("select_by", "squared_loss")))
  return ({"k": chosen.k, "sigma": chosen.sigma, "temperature": chosen.temperature,
           "sigma_scale": scale, "validation_accuracy": chosen.accuracy,
           "validation_squared_loss": chosen.squared_loss,
           "select_by": str(rcfg.get("select_by", "squared_loss"))},
          [vars(p) for p in points])


def parse_backend_options(text: str | None) -> dict:
  """``"mode=tree_ah,num_leaves=235,reorder=300"`` -> {"mode": "tree_ah", "num_leaves": 235, ...}.

  A string (not a nested ConfigDict) so any option can be set from the command line with
  ``--config.resmem.backend_options=...``; values that parse as int or float become numbers.
  """
  options = {}
  for item in filter(None, (part.strip() for part in (text or "").split(","))):
    if "=" not in item:
      raise ValueError(f"resmem.backend_options entries must be key=value, got {item!r}")
    key, value = (x.strip() for x in item.split("=", 1))
    for cast in (int, float):
      try:
        value = cast(value)
        break
      except ValueError:
        pass
    options[key] = value
  return options


def _memory_options(rcfg) -> dict:
  opts = {"backend": str(rcfg.backend), "residual_format": str(rcfg.residual_format)}
  if str(rcfg.residual_format) == "sparse":
    opts["top_m"] = int(rcfg.top_m)
  opts.update(parse_backend_options(rcfg.get("backend_options")))
  return opts


def _check_tune_recall(rcfg, num_keys: int, has_val: bool) -> None:
  """Fails before any memory is built when ``resmem.tune_recall`` cannot be honoured."""
  target = rcfg.get("tune_recall")
  if target is None:
    return
  if not 0 < float(target) <= 1:
    raise ValueError(f"resmem.tune_recall must be in (0, 1], got {target}")
  if str(rcfg.backend) != "scann":
    raise ValueError(f"resmem.tune_recall tunes ScaNN; resmem.backend is {rcfg.backend!r}")
  if not has_val:
    raise ValueError("resmem.tune_recall tunes on the validation embeddings: set data.val_fraction > 0")
  from resmem_jax.memory import scann_index  # pylint: disable=g-import-not-at-top
  mode = parse_backend_options(rcfg.get("backend_options")).get("mode")
  if scann_index.default_options(num_keys, mode)["mode"] == "brute_force":
    raise ValueError(f"resmem.tune_recall: a ScaNN memory of {num_keys} keys searches by brute "
                     "force (exact, nothing to tune); set resmem.backend_options='mode=tree_ah' "
                     "(or 'mode=ah') for a partitioned index")


def run(config, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
  """Trains (if needed), memorizes and evaluates; returns and writes ``results.json``."""
  from resmem_jax import data as data_lib
  from resmem_jax import memory as memory_lib
  from resmem_jax import models as models_lib

  mesh_lib.initialize_distributed()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rcfg = config.resmem
  for name in ("k", "sigma", "temperature"):
    value = rcfg.get(name)
    if value is not None and (not np.isfinite(float(value)) or float(value) <= 0
                              or (name == "k" and int(value) != value)):
      raise ValueError(f"resmem.{name} must be {'a positive integer' if name == 'k' else '> 0'}"
                       f", got {value}")

  module, variables, step = _trained_model(config, workdir)
  info = data_lib.dataset_info(config.data)
  mesh = mesh_lib.data_mesh()
  batch_size = mesh_lib.pad_to_multiple(int(rcfg.eval_batch_size), mesh_lib.num_data_shards(mesh))
  variables = mesh_lib.replicate(variables, mesh)
  forward = embed_lib.make_forward(module, mesh)

  def embed(split, max_batches=None):
    batches = data_lib.eval_batches(config.data, split, batch_size)
    if max_batches is not None:
      batches = itertools.islice(batches, max_batches)
    return embed_lib.run_forward(
        forward, variables, batches, mesh,
        total_batches=-(-data_lib.num_examples(config.data, split) // batch_size), desc=split,
        progress=progress)

  signature = _data_signature(config, step)
  cache_dir = workdir / "embeddings"
  train_out = _cached_split(cache_dir, "train", signature, lambda: embed("train"))
  has_val = data_lib.num_examples(config.data, "validation") > 0
  val_out = _cached_split(cache_dir, "validation", signature, lambda: embed("validation")) if has_val else None
  embed("test", max_batches=1)  # warm-up: compile for the test batch shape before timing
  test_out = embed("test")
  timing_repeats = max(1, int(rcfg.get("timing_repeats", 1)))
  forward_seconds = min([test_out.seconds] + [embed("test").seconds for _ in range(timing_repeats - 1)])

  _check_tune_recall(rcfg, train_out.size, has_val)
  fixed = all(rcfg.get(n) is not None for n in ("k", "sigma", "temperature"))
  mem_dir = workdir / "memory"
  mem_signature = dict(signature, memory_options=_memory_options(rcfg),
                       fixed={n: rcfg.get(n) for n in ("k", "sigma", "temperature")},
                       k_grid=list(rcfg.k_grid), sigma_grid=list(rcfg.sigma_grid),
                       temperature_grid=list(rcfg.temperature_grid),
                       sigma_relative=bool(rcfg.get("sigma_relative", True)),
                       tune_recall=rcfg.get("tune_recall"),
                       select_by=str(rcfg.get("select_by", "squared_loss")))
  state_path = mem_dir / "resmem.json"
  memory = None
  reused = False
  if state_path.exists() and (mem_dir / "index").exists():
    state = json.loads(state_path.read_text())
    if state.get("signature") == mem_signature:
      try:
        memory = memory_lib.load_memory(mem_dir / "index")
      except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"the saved memory in {mem_dir} cannot be used ({err}); delete "
                         f"{mem_dir} to rebuild it from the checkpoint") from err
      chosen, grid, tuning = state["hparams"], state.get("grid", []), state.get("tuning")
      reused = True
      logging.info("reusing memory in %s", mem_dir)
  if memory is None:
    if fixed:
      chosen = {"k": int(rcfg.k), "sigma": float(rcfg.sigma),
                "temperature": float(rcfg.temperature)}
      grid = []
      search_memory = None
    else:
      if val_out is None:
        raise ValueError("choosing k/sigma/temperature needs a validation split: set "
                         "data.val_fraction > 0, or fix resmem.k, resmem.sigma and resmem.temperature")
      t0 = float(rcfg.temperature) if rcfg.get("temperature") is not None else 1.0
      search_memory = memory_lib.build_memory(
          train_out.embeddings, _training_residuals(train_out, t0), **_memory_options(rcfg))
      if rcfg.get("tune_recall") is not None:
        # The selection query runs at the grid's largest k: meet the recall target there too,
        # so k, sigma and T are chosen on neighbours as good as the ones served.
        k_max = min(max(int(v) for v in rcfg.k_grid), search_memory.size)
        search_tuning = search_memory.tune_search(val_out.embeddings, k_max, float(rcfg.tune_recall))
        logging.info("scann query settings for the k=%d selection query: leaves %s, reorder %s, "
                     "recall %.4f", k_max, search_tuning["leaves_to_search"],
                     search_tuning["reorder"], search_tuning["recall"])
      chosen, grid = choose_hparams(rcfg, train_out, val_out, search_memory)
    metadata = {"model_config": config.model.to_dict(), "checkpoint_step": int(step),
                "dataset": str(config.data.name), "temperature": chosen["temperature"]}
    if search_memory is not None:
      # Same keys and index, residuals at the chosen T (no second index build).
      memory = search_memory.with_residuals(
          _training_residuals(train_out, chosen["temperature"]), metadata=metadata)
    else:
      memory = memory_lib.build_memory(
          train_out.embeddings, _training_residuals(train_out, chosen["temperature"]),
          metadata=metadata, **_memory_options(rcfg))
    tuning = None
    if rcfg.get("tune_recall") is not None:
      # ScaNN's query settings on the real query distribution (validation embeddings) at the
      # chosen k: the fastest that keeps recall@k >= tune_recall against exact search.
      tuning = memory.tune_search(val_out.embeddings, int(chosen["k"]), float(rcfg.tune_recall))
      tuning.pop("tried")
      logging.info("scann query settings tuned on validation: %s", tuning)
    if jax.process_index() == 0:
      memory.save(mem_dir / "index")
      write_json_atomic(state_path, {"signature": mem_signature, "hparams": chosen, "grid": grid,
                                     "tuning": tuning})

  k, sigma, temperature = int(chosen["k"]), float(chosen["sigma"]), float(chosen["temperature"])
  if k > memory.size:
    raise ValueError(f"resmem.k={k} is larger than the memory ({memory.size} training examples)")

  def resmem_predict(out):
    return np.asarray(memory.predict(_softmax(out.logits, temperature), out.embeddings, k, sigma))

  # The first call compiles for the test shapes; the timed ones (fastest kept, like the forward
  # pass above) are what a user sees at serving time and must return the same prediction.
  test_pred = resmem_predict(test_out)
  query_seconds = float("inf")
  for _ in range(timing_repeats):
    t0 = time.perf_counter()
    timed_pred = resmem_predict(test_out)
    query_seconds = min(query_seconds, time.perf_counter() - t0)
    np.testing.assert_allclose(timed_pred, test_pred, rtol=1e-5, atol=1e-6)
  train_pred = resmem_predict(train_out)

  base_test = _report(_softmax(test_out.logits), test_out.labels)
  res_test = _report(test_pred, test_out.labels)
  base_train_acc = float(metrics.accuracy(train_out.logits, train_out.labels))
  res_train_acc = float(metrics.accuracy(train_pred, train_out.labels))

  def block(test, train_acc):
    return {"test_accuracy": test["accuracy"], "test_error": test["error"],
            "test_squared_loss": test["squared_loss"], "test_log_loss": test["log_loss"],
            "train_accuracy": train_acc}

  num_params = models_lib.count_params(jax.device_get(variables)["params"])
  results = {
      "dataset": str(config.data.name),
      "model": str(config.model.name),
      "model_config": config.model.to_dict(),
      "num_params": int(num_params),
      "checkpoint_step": int(step),
      "num_examples": {"train": train_out.size, "validation": val_out.size if val_out else 0,
                       "test": test_out.size},
      "hparams": {"k": k, "sigma": sigma, "temperature": temperature,
                  "chosen_on": "fixed" if fixed else "validation",
                  "validation_accuracy": chosen.get("validation_accuracy"),
                  "validation_squared_loss": chosen.get("validation_squared_loss"),
                  "select_by": chosen.get("select_by")},
      "memory": {"backend": str(rcfg.backend), "residual_format": str(rcfg.residual_format),
                 "size": int(memory.size), "dim": int(memory.dim), "reused": reused,
                 "search_tuning": tuning},
      "base": block(base_test, base_train_acc),
      "resmem": block(res_test, res_train_acc),
      "timing": {
          "base_forward_seconds": forward_seconds,
          "resmem_query_and_combine_seconds": query_seconds,
          "resmem_total_seconds": forward_seconds + query_seconds,
          "resmem_over_base": (forward_seconds + query_seconds) / max(forward_seconds, 1e-9),
          "timing_repeats": timing_repeats,
          "devices": jax.device_count(),
          "platform": jax.devices()[0].platform,
      },
  }
  if jax.process_index() == 0:
    write_json_atomic(workdir / "results.json", results)
  print(format_table(results))
  return results


def _training_residuals(out: embed_lib.SplitOutputs, temperature: float) -> np.ndarray:
  """onehot(y) - softmax(z / T) for every example of a split."""
  from resmem_jax.residuals import residuals
  return np.asarray(residuals(out.labels, out.logits, temperature))


def format_table(results: dict) -> str:
  """Base vs ResMem side by side, as printed by the binary."""
  hp = results["hparams"]
  rows = [("test accuracy", "test_accuracy", 100, "%"), ("test error (0-1)", "test_error", 100, "%"),
          ("test squared loss", "test_squared_loss", 1, ""), ("test log loss", "test_log_loss", 1, ""),
          ("train accuracy", "train_accuracy", 100, "%")]
  lines = [f"{results['dataset']} / {results['model']} ({results['num_params']:,} params), "
           f"k={hp['k']} sigma={hp['sigma']:.4g} T={hp['temperature']:g} ({hp['chosen_on']})",
           f"{'':20s}{'base':>12s}{'resmem':>12s}"]
  for label, key, scale, unit in rows:
    b, r = results["base"][key] * scale, results["resmem"][key] * scale
    lines.append(f"{label:20s}{b:11.3f}{unit or ' '}{r:11.3f}{unit or ' '}")
  t = results["timing"]
  lines.append(f"prediction time on test: base forward {t['base_forward_seconds']:.3f}s, "
               f"resmem {t['resmem_total_seconds']:.3f}s ({t['resmem_over_base']:.2f}x, "
               f"{results['memory']['backend']}; fastest of {t.get('timing_repeats', 1)})")
  return "\n".join(lines)
