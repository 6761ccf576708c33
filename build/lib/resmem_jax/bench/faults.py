"""The fault catalogue: bad inputs, corruptions and kills against the public API, the binaries and
the workdir, each run here and classified by what a user sees (BUILD_NOTES.md's table).

Outcomes:
  clear error  the call raised one line that names the problem (a binary: exit status != 0 and
               one line on stderr, no traceback)
  works        a valid edge case: the call returns, and the result is checked (finite, exact)
  recovered    a damaged cache was rebuilt (or a killed run rerun) and the results are identical
               to an undamaged run's
  refused      the workdir's record refused the run before any work, in one line
  UNCLEAR      a traceback, a multi-line message or an unexpected exception  (should never occur)
  SILENT       a wrong or non-finite result returned without complaint      (should never occur)

Run with ``python -m experiments.bench_faults``; it takes about ten minutes on two cores.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
GOOD = ("clear error", "works", "recovered", "refused")


@dataclasses.dataclass
class Outcome:
  area: str
  case: str
  outcome: str
  detail: str


def _one_line(err: BaseException) -> str:
  return f"{type(err).__name__}: {err}"


def expect_error(fn: Callable, *types) -> tuple[str, str]:
  """'clear error' when ``fn`` raises one of ``types`` with a one-line message."""
  types = types or (ValueError,)
  try:
    fn()
  except types as err:  # pylint: disable=catching-non-exception
    message = str(err)
    if "\n" in message.strip() or not message.strip():
      return "UNCLEAR", _one_line(err)[:300]
    return "clear error", message[:300]
  except Exception as err:  # pylint: disable=broad-except
    return "UNCLEAR", _one_line(err)[:300]
  return "SILENT", "no error raised"


def expect_works(fn: Callable[[], str]) -> tuple[str, str]:
  """'works' when ``fn`` returns a description (it asserts what it checks)."""
  try:
    return "works", fn()
  except AssertionError as err:
    return "SILENT", f"wrong result: {err}"[:300]
  except Exception as err:  # pylint: disable=broad-except
    return "UNCLEAR", _one_line(err)[:300]


# ----------------------------------------------------------------------------- the public API


def api_cases() -> list[tuple[str, Callable]]:
  import resmem_jax
  from resmem_jax.core import predictor
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(300, 8)).astype(np.float32)
  logits = rng.normal(size=(300, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 300)
  res = resmem_jax.residuals(labels, logits)
  queries = rng.normal(size=(20, 8)).astype(np.float32)
  base = np.asarray(predictor.base_prediction(logits[:20], 1.0))
  exact = resmem_jax.build_memory(keys, res, backend="exact", labels=labels)
  scann = resmem_jax.build_memory(keys, res, backend="scann")
  tree = resmem_jax.build_memory(keys, res, backend="scann", mode="tree_ah", num_leaves=8,
                                 leaves_to_search=1)
  err = expect_error

  def finite_prediction(sigma):
    def check():
      pred = resmem_jax.predict(exact, base, queries, 8, sigma)
      assert np.all(np.isfinite(pred)), "non-finite prediction"
      return f"finite prediction at sigma={sigma}"
    return check

  def cold_residuals():
    r = resmem_jax.residuals(labels[:4], logits[:4] * 50, 1e-30)
    assert np.all(np.isfinite(r)), "non-finite residuals"
    return "finite residuals at T=1e-30"

  def zero_queries(memory):
    def check():
      d, i = memory.search(np.zeros((0, 8), np.float32), 5)
      assert d.shape == i.shape == (0, 5)
      return "shapes (0, 5)"
    return check

  def large_k_tree():
    d, i = tree.search(queries, 200)
    assert all(len(set(row)) == 200 for row in i), "repeated neighbour (padding)"
    assert np.all(i >= 0) and np.all(np.isfinite(d)), "padding returned"
    return "200 distinct valid neighbours per query with 1 of 8 leaves searched"

  def huge_keys():
    try:
      memory = resmem_jax.build_memory(keys * 1e20, res, backend="exact")
    except ValueError as e:
      return f"refused: {e}"[:300]
    d, i = memory.search(queries * 1e20, 3)
    assert np.all(np.isfinite(d)) and np.all(i >= 0), "inf distance or id -1"
    return "finite distances and valid ids"

  def duplicate_keys():
    memory = resmem_jax.build_memory(np.repeat(keys[:1], 10, 0), res[:10], backend="exact")
    d, i = memory.search(keys[:1], 10)
    assert np.all(d == 0) and sorted(i[0]) == list(range(10)), "ties lost"
    return "10 tied neighbours, all at distance 0"

  return [
      ("residuals: float labels", lambda: err(lambda: resmem_jax.residuals(labels * 1.0, logits))),
      ("residuals: label out of range", lambda: err(
          lambda: resmem_jax.residuals(labels + 5, logits))),
      ("residuals: NaN logits", lambda: err(
          lambda: resmem_jax.residuals(labels, logits * np.nan))),
      ("residuals: inf logits", lambda: err(
          lambda: resmem_jax.residuals(labels, logits + np.inf))),
      ("residuals: 1-D logits", lambda: err(lambda: resmem_jax.residuals(labels, logits[:, 0]))),
      ("residuals: integer logits", lambda: err(
          lambda: resmem_jax.residuals(labels, logits.astype(int)))),
      ("residuals: lengths differ", lambda: err(lambda: resmem_jax.residuals(labels[:5], logits))),
      ("residuals: T = 0", lambda: err(lambda: resmem_jax.residuals(labels, logits, 0.0))),
      ("residuals: T = -1", lambda: err(lambda: resmem_jax.residuals(labels, logits, -1.0))),
      ("residuals: T = nan", lambda: err(lambda: resmem_jax.residuals(labels, logits, np.nan))),
      ("residuals: T = 'hot'", lambda: err(lambda: resmem_jax.residuals(labels, logits, "hot"))),
      ("residuals: T = 1e-30, logits x 50", lambda: expect_works(cold_residuals)),
      ("regression residuals: shapes differ", lambda: err(
          lambda: resmem_jax.regression_residuals(np.zeros(3), np.zeros(4)))),
      ("regression residuals: NaN target", lambda: err(
          lambda: resmem_jax.regression_residuals(np.array([np.nan]), np.zeros(1)))),
      ("regression residuals: 3-D", lambda: err(
          lambda: resmem_jax.regression_residuals(np.zeros((2, 2, 2)), np.zeros((2, 2, 2))))),
      ("build_memory: NaN keys", lambda: err(
          lambda: resmem_jax.build_memory(keys * np.nan, res))),
      ("build_memory: integer keys", lambda: err(
          lambda: resmem_jax.build_memory(keys.astype(int), res))),
      ("build_memory: 1-D keys", lambda: err(lambda: resmem_jax.build_memory(keys[:, 0], res))),
      ("build_memory: empty keys", lambda: err(lambda: resmem_jax.build_memory(keys[:0], res[:0]))),
      ("build_memory: row counts differ", lambda: err(
          lambda: resmem_jax.build_memory(keys[:10], res))),
      ("build_memory: backend 'faiss'", lambda: err(
          lambda: resmem_jax.build_memory(keys, res, backend="faiss"))),
      ("build_memory: format 'sprse'", lambda: err(
          lambda: resmem_jax.build_memory(keys, res, residual_format="sprse"))),
      ("build_memory: top_m = 0", lambda: err(
          lambda: resmem_jax.build_memory(keys, res, residual_format="sparse", top_m=0))),
      ("build_memory: unknown scann option", lambda: err(
          lambda: resmem_jax.build_memory(keys, res, backend="scann", num_leafs=4))),
      ("build_memory: scann mode typo", lambda: err(
          lambda: resmem_jax.build_memory(keys, res, backend="scann", mode="tre_ah"))),
      ("build_memory: unknown exact option", lambda: err(
          lambda: resmem_jax.build_memory(keys, res, block=3))),
      ("build_memory: labels out of range", lambda: err(
          lambda: resmem_jax.build_memory(keys, res, labels=labels + 9))),
      ("build_memory: labels of the wrong length", lambda: err(
          lambda: resmem_jax.build_memory(keys, res, labels=labels[:7]))),
      ("build_memory: metadata not JSON", lambda: err(
          lambda: resmem_jax.build_memory(keys, res, metadata={"x": object()}))),
      ("build_memory / search: keys and queries x 1e20", lambda: expect_works(huge_keys)),
      ("search: k = 0", lambda: err(lambda: exact.search(queries, 0))),
      ("search: k > memory size", lambda: err(lambda: exact.search(queries, 301))),
      ("search: k = 2.5", lambda: err(lambda: exact.search(queries, 2.5))),
      ("search: queries of the wrong dimension", lambda: err(
          lambda: exact.search(queries[:, :4], 3))),
      ("search: NaN queries", lambda: err(lambda: exact.search(queries * np.nan, 3))),
      ("search: zero queries (exact)", lambda: expect_works(zero_queries(exact))),
      ("search: zero queries (scann brute force)", lambda: expect_works(zero_queries(scann))),
      ("search: zero queries (scann tree-AH)", lambda: expect_works(zero_queries(tree))),
      ("search: k = 200 on tree-AH, 1 of 8 leaves", lambda: expect_works(large_k_tree)),
      ("search: 10 identical keys", lambda: expect_works(duplicate_keys)),
      ("predict: sigma = 0", lambda: err(lambda: resmem_jax.predict(exact, base, queries, 4, 0.0))),
      ("predict: sigma = -1", lambda: err(
          lambda: resmem_jax.predict(exact, base, queries, 4, -1.0))),
      ("predict: sigma = nan", lambda: err(
          lambda: resmem_jax.predict(exact, base, queries, 4, np.nan))),
      ("predict: sigma an array", lambda: err(
          lambda: resmem_jax.predict(exact, base, queries, 4, np.ones(20)))),
      ("predict: sigma = 1e-30", lambda: expect_works(finite_prediction(1e-30))),
      ("predict: sigma = 1e30", lambda: expect_works(finite_prediction(1e30))),
      ("predict: base of the wrong width", lambda: err(
          lambda: resmem_jax.predict(exact, base[:, :3], queries, 4, 1.0))),
      ("predict: base rows differ from queries", lambda: err(
          lambda: resmem_jax.predict(exact, base[:5], queries, 4, 1.0))),
      ("add: keys of the wrong dimension", lambda: err(
          lambda: exact.add(keys[:2, :4], res[:2], labels[:2]))),
      ("add: labels missing on a labelled memory", lambda: err(lambda: exact.add(keys[:2], res[:2]))),
      ("add: residual width differs", lambda: err(
          lambda: exact.add(keys[:2], res[:2, :3], labels[:2]))),
      ("tune_search: exact backend", lambda: err(lambda: exact.tune_search(queries, 4))),
      ("tune_search: scann brute force", lambda: err(lambda: scann.tune_search(queries, 4))),
      ("tune_search: target recall 1.5", lambda: err(lambda: tree.tune_search(queries, 4, 1.5))),
      ("tune_search: zero queries", lambda: err(
          lambda: tree.tune_search(np.zeros((0, 8), np.float32), 4))),
  ]


def save_cases(tmp: pathlib.Path) -> list[tuple[str, Callable]]:
  import resmem_jax
  rng = np.random.default_rng(1)
  keys = rng.normal(size=(400, 6)).astype(np.float32)
  res = resmem_jax.residuals(rng.integers(0, 4, 400), rng.normal(size=(400, 4)).astype(np.float32))
  counter = iter(range(1000))

  def saved(backend="exact", **options):
    path = tmp / f"mem{next(counter)}"
    resmem_jax.build_memory(keys, res, backend=backend, **options).save(path)
    return path

  def edit_manifest(change):
    def case():
      path = saved("scann", mode="tree_ah", num_leaves=8)
      manifest = json.loads((path / "manifest.json").read_text())
      change(manifest)
      (path / "manifest.json").write_text(json.dumps(manifest))
      return resmem_jax.load_memory(path)
    return case

  def damage(fn):
    def case():
      path = saved()
      fn(path)
      return resmem_jax.load_memory(path)
    return case

  def flip(path):
    data = bytearray((path / "keys.npy").read_bytes())
    data[-5] ^= 1
    (path / "keys.npy").write_bytes(bytes(data))

  def foreign_folder():
    path = tmp / f"user{next(counter)}"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    try:
      resmem_jax.build_memory(keys, res).save(path)
    finally:
      assert (path / "notes.txt").read_text() == "mine", "the user's file was touched"

  def onto_file():
    path = tmp / f"file{next(counter)}.txt"
    path.write_text("mine")
    try:
      resmem_jax.build_memory(keys, res).save(path)
    finally:
      assert path.read_text() == "mine", "the user's file was touched"

  def manifest_field(name):
    return lambda m: m.pop(name)

  def set_field(name, value):
    return lambda m: m.__setitem__(name, value)

  def centre(m):
    index = m.get("index") or {}
    text = json.dumps(index)
    m["index"] = json.loads(text.replace("0.", "1.", 1))

  def resave_over_memory():
    path = saved()
    resmem_jax.build_memory(keys[:10], res[:10]).save(path)
    assert resmem_jax.load_memory(path).size == 10
    return "replaced atomically"

  err = expect_error
  return [
      ("save: onto a folder of the user's files", lambda: err(foreign_folder)),
      ("save: onto a regular file", lambda: err(onto_file)),
      ("save: over an earlier memory", lambda: expect_works(resave_over_memory)),
      ("load: path missing", lambda: err(lambda: resmem_jax.load_memory(tmp / "absent"),
                                         FileNotFoundError, ValueError)),
      ("load: empty folder", lambda: err(lambda: resmem_jax.load_memory(tmp),
                                         FileNotFoundError, ValueError)),
      ("load: manifest not JSON", lambda: err(damage(
          lambda p: (p / "manifest.json").write_text("{garbage")))),
      ("load: keys.npy truncated", lambda: err(damage(
          lambda p: (p / "keys.npy").write_bytes((p / "keys.npy").read_bytes()[:100])))),
      ("load: one bit flipped in keys.npy", lambda: err(damage(flip))),
      ("load: residuals.npy deleted", lambda: err(damage(
          lambda p: (p / "residuals.npy").unlink()))),
      ("load: an extra file in the memory", lambda: err(damage(
          lambda p: (p / "extra.npy").write_bytes(b"x")))),
      ("manifest: files = {}", lambda: err(edit_manifest(set_field("files", {})))),
      ("manifest: backend swapped", lambda: err(edit_manifest(set_field("backend", "exact")))),
      ("manifest: ScaNN centre edited", lambda: err(edit_manifest(centre))),
      ("manifest: n deleted", lambda: err(edit_manifest(manifest_field("n")))),
      ("manifest: format version 1", lambda: err(edit_manifest(set_field("format_version", 1)))),
      ("manifest: residual format swapped", lambda: err(edit_manifest(
          set_field("residual_format", "bfloat16")))),
  ]


# ----------------------------------------------------------------------------- binaries


def _binary(args: list[str], workdir: pathlib.Path, module: str = "experiments.resmem",
            timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *args, f"--workdir={workdir}"],
                        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout)


def classify_binary(proc: subprocess.CompletedProcess, workdir: pathlib.Path | None = None,
                    prefix: str = "config error: ") -> tuple[str, str]:
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  last = lines[-1] if lines else ""
  if proc.returncode == 0:
    return "SILENT", "exit status 0"
  prefixes = (prefix, "flag error: ") if prefix == "config error: " else (prefix,)
  if "Traceback" in proc.stderr or not last.startswith(prefixes):
    return "UNCLEAR", (last or f"exit status {proc.returncode}")[:300]
  if workdir is not None and workdir.exists() and prefix == "config error: ":
    return "UNCLEAR", f"{last[:250]} (but {workdir} was created)"
  return ("refused" if prefix == "workdir error: " else "clear error"), last[:300]


DIGITS = "--config=digits:tiny"
BAD_FLAGS = [
    ("--config.resmem.backend=faiss",), ("--config.resmem.residual_format=sprse",),
    ("--config.resmem.select_by=acc",), ("--config.resmem.backend_options=mode=tre_ah",),
    ("--config.resmem.backend_options=num_leafs=4",), ("--config.resmem.backend_options=tree_ah",),
    ("--config.resmem.k=0",), ("--config.resmem.sigma=-1",), ("--config.resmem.temperature=0",),
    ("--config.resmem.k_grid=()",), ("--config.resmem.sigma_grid=(0.0,)",),
    ("--config.resmem.knn_lambda=2",), ("--config.resmem.tune_recall=1.5",),
    ("--config.resmem.tune_recall=0.9", "--config.resmem.backend=exact"),
    ("--config.resmem.tune_recall=0.9",), ("--config.resmem.max_validation_rows=0",),
    ("--config.resmem.timing_repeats=0",), ("--config.resmem.eval_batch_size=0",),
    ("--config.resmem.k_grid=abc",), ("--config.data.name=svhn",),
    ("--config.data.name=binarized_mnist",), ("--config.data.val_fraction=1.5",),
    ("--config.data.train_fraction=0",), ("--config.data.val_fraction=0",),
    ("--config.model.name=vgg",), ("--config.model.name=cifar_resnet", "--config.model.depth=21"),
    ("--config.model.width=0",), ("--config.model.width=2.5",), ("--config.train.optimizer=lamb",),
    ("--config.train.schedule=linear",), ("--config.train.dtype=int8",),
    ("--config.train.batch_size=0",), ("--config.train.batch_size=2.5",),
    ("--config.train.num_epochs=0",), ("--config.train.learning_rate=-1",),
    ("--config.train.num_epochs=abc",), ("--config.train.num_epoch=3",),
    ("--config.trian.num_epochs=3",), ("--workdr=/tmp/elsewhere",),
]


def binary_cases(tmp: pathlib.Path) -> list[tuple[str, Callable]]:
  cases = []
  for flags in BAD_FLAGS:
    def case(flags=flags):
      workdir = tmp / f"bad{abs(hash(flags))}"
      return classify_binary(_binary([DIGITS, *flags], workdir), workdir)
    cases.append((" ".join(flags), case))
  for config in ("nosuch", "my_configs/nosuch.py", "resmem_jax/configs/digits.py:nosuch", "/tmp"):
    def case(config=config):
      workdir = tmp / f"badcfg{abs(hash(config))}"
      return classify_binary(_binary([f"--config={config}"], workdir), workdir)
    cases.append((f"--config={config}", case))
  return cases


# ----------------------------------------------------------------------------- the workdir


def _results(workdir: pathlib.Path) -> dict:
  results = json.loads((workdir / "results.json").read_text())
  return {h: results[h] for h in ("base", "resmem")} | {"hparams": results["hparams"]}


def workdir_cases(tmp: pathlib.Path) -> list[tuple[str, Callable]]:
  reference = tmp / "reference"
  proc = _binary([DIGITS], reference)
  if proc.returncode != 0:
    raise RuntimeError(f"the reference run failed: {proc.stderr[-2000:]}")
  expected = _results(reference)
  counter = iter(range(1000))

  def fresh_copy() -> pathlib.Path:
    target = tmp / f"copy{next(counter)}"
    shutil.copytree(reference, target)
    return target

  def refused(*flags):
    def case():
      workdir = fresh_copy()
      return classify_binary(_binary([DIGITS, *flags], workdir), prefix="workdir error: ")
    return case

  def rerun_recovers(damage, *flags):
    def case():
      workdir = fresh_copy()
      damage(workdir)
      proc = _binary([DIGITS, *flags], workdir)
      if proc.returncode != 0:
        return classify_binary(proc)
      if _results(workdir) != expected:
        return "SILENT", "results differ from the undamaged run"
      return "recovered", "identical results"
    return case

  def rerun_errors(damage):
    def case():
      workdir = fresh_copy()
      damage(workdir)
      return classify_binary(_binary([DIGITS], workdir), prefix="workdir error: ")
    return case

  def checkpoint_files(workdir):
    step = max(p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    return sorted((p for p in (step / "variables").rglob("*") if p.is_file()),
                  key=lambda p: -p.stat().st_size)

  def flip_checkpoint(workdir):
    path = checkpoint_files(workdir)[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))

  def truncate_checkpoint(workdir):
    for path in checkpoint_files(workdir):
      path.write_bytes(path.read_bytes()[:16])

  def write(name, text):
    return lambda w: (w / name).write_text(text)

  def remove(name):
    return lambda w: shutil.rmtree(w / name) if (w / name).is_dir() else (w / name).unlink()

  def truncate(name, size=100):
    return lambda w: (w / name).write_bytes((w / name).read_bytes()[:size])

  def start_over():
    workdir = fresh_copy()
    proc = _binary([DIGITS, "--config.train.learning_rate=0.01", "--start_over"], workdir)
    if proc.returncode != 0:
      return classify_binary(proc)
    moved = list((workdir / "superseded").iterdir())
    if len(moved) != 1 or not (moved[0] / "checkpoints").is_dir():
      return "SILENT", "the earlier run was not kept"
    return "works", "earlier run moved to WORKDIR/superseded/, a new model trained"

  def retrain_after_deleting_checkpoints():
    workdir = fresh_copy()
    shutil.rmtree(workdir / "checkpoints")
    proc = _binary([DIGITS, "--config.train.learning_rate=0.01"], workdir)
    results = json.loads((workdir / "results.json").read_text())
    if proc.returncode != 0:
      return classify_binary(proc)
    if results["memory"]["reused"]:
      return "SILENT", "the old model's memory served the new model"
    return "works", "new model trained, memory rebuilt (reused: false)"

  def changed_memory_field():
    workdir = fresh_copy()
    proc = _binary([DIGITS, "--config.resmem.k_grid=(1,4,16,64)"], workdir)
    assert proc.returncode == 0, proc.stderr[-300:]
    results = json.loads((workdir / "results.json").read_text())
    assert not results["memory"]["reused"], "the memory of other settings was reused"
    assert results["base"] == expected["base"], "the base model changed"
    return "same model, memory rebuilt for the new grid (reused: false)"

  return [
      ("rerun: train.learning_rate changed", refused("--config.train.learning_rate=0.01")),
      ("rerun: model.width changed", refused("--config.model.width=64")),
      ("rerun: data.train_fraction changed", refused("--config.data.train_fraction=0.5")),
      ("rerun: seed changed", refused("--config.seed=3")),
      ("rerun: train.optimizer changed", refused("--config.train.optimizer=adam")),
      ("rerun: train.num_epochs changed", refused("--config.train.num_epochs=3")),
      ("rerun: checkpoint changed on disk (1 byte)", rerun_errors(flip_checkpoint)),
      ("rerun: checkpoint files truncated", rerun_errors(truncate_checkpoint)),
      ("rerun: run.json not JSON", rerun_errors(write("run.json", "{trunc"))),
      ("rerun: run.json deleted (model kept)", rerun_errors(remove("run.json"))),
      ("rerun: --start_over with a new learning rate", start_over),
      ("rerun: checkpoints deleted, new learning rate", retrain_after_deleting_checkpoints),
      ("rerun: resmem.k_grid changed", lambda: expect_works(changed_memory_field)),
      ("rerun: train.log_every_steps changed", rerun_recovers(
          lambda w: None, "--config.train.log_every_steps=3")),
      ("cache: memory keys.npy truncated", rerun_recovers(truncate("memory/index/keys.npy"))),
      ("cache: memory manifest garbage", rerun_recovers(write("memory/index/manifest.json", "x"))),
      ("cache: memory/resmem.json garbage", rerun_recovers(write("memory/resmem.json", "{"))),
      ("cache: memory folder deleted", rerun_recovers(remove("memory"))),
      ("cache: results.json garbage", rerun_recovers(write("results.json", "{"))),
      ("cache: model_info.json garbage", rerun_recovers(write("model_info.json", "{"))),
      ("cache: metrics.jsonl last line cut", rerun_recovers(truncate("metrics.jsonl", 300))),
      ("cache: tensorboard folder deleted", rerun_recovers(remove("tensorboard"))),
  ]


def kill_cases(tmp: pathlib.Path, count: int, seed: int = 0) -> list[tuple[str, Callable]]:
  """SIGKILL the main job at random instants, rerun: the results equal an uninterrupted run's."""
  reference = tmp / "kill_reference"
  if _binary([DIGITS], reference).returncode != 0:
    raise RuntimeError("the reference run failed")
  expected = _results(reference)
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)
  delays = sorted(random.Random(seed).sample([round(0.5 + 0.25 * i, 2) for i in range(28)], count))

  def case(delay):
    workdir = tmp / f"killed{delay}"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.resmem", DIGITS,
                             f"--workdir={workdir}"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = _binary([DIGITS], workdir)
    if rerun.returncode != 0:
      return classify_binary(rerun)
    if _results(workdir) != expected:
      return "SILENT", "results differ from the uninterrupted run"
    return "recovered", ("finished before the kill" if finished else
                         f"killed at {delay} s, rerun identical")

  return [(f"SIGKILL of the main job after {d} s, rerun", lambda d=d: case(d)) for d in delays]


def run_catalogue(kills: int = 12, log: Callable[[str], None] = print) -> list[Outcome]:
  """Every case; returns the outcomes in order (areas: API, save/load, binary, workdir, kill)."""
  outcomes = []
  with tempfile.TemporaryDirectory(prefix="resmem_faults_") as tmp_name:
    tmp = pathlib.Path(tmp_name)
    areas = [("public API", api_cases()), ("memory save/load", save_cases(tmp)),
             ("binary flags", binary_cases(tmp)), ("workdir", workdir_cases(tmp)),
             ("kill and rerun", kill_cases(tmp, kills))]
    for area, cases in areas:
      for name, case in cases:
        outcome, detail = case()
        detail = detail.replace(tmp_name, "TMP")  # the temporary folder's random name
        outcomes.append(Outcome(area, name, outcome, detail))
        log(f"{area:16s} | {name:55s} | {outcome:11s} | {detail[:110]}")
  return outcomes


def markdown(outcomes: list[Outcome]) -> str:
  lines = ["| # | area | fault or input | outcome | what the user sees |", "|---|---|---|---|---|"]
  for i, o in enumerate(outcomes, 1):
    detail = o.detail.replace("|", "\\|").replace("\n", " ")
    lines.append(f"| {i} | {o.area} | `{o.case}` | {o.outcome} | {detail} |")
  return "\n".join(lines)


def summary(outcomes: list[Outcome]) -> dict:
  counts = {}
  for o in outcomes:
    counts[o.outcome] = counts.get(o.outcome, 0) + 1
  return counts
