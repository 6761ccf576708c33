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

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]  # experiments/ sits in the checkout root
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


def input_cases() -> list[tuple[str, Callable]]:
  """Inputs checked where they enter (issue 24): labels of every split, empty splits, complex
  arrays, degenerate memories, ScaNN option ranges, JSON nested too deeply."""
  import resmem_jax
  from resmem_jax import jsonio
  rng = np.random.default_rng(2)
  weights = rng.normal(size=(8, 5)).astype(np.float32)

  def model(x):  # a fixed linear "model": logits and its inputs as the embedding
    return x @ weights, x

  x = rng.normal(size=(160, 8)).astype(np.float32)
  y = rng.integers(0, 5, 160)
  train, validation, test = (x[:80], y[:80]), (x[80:120], y[80:120]), (x[120:], y[120:])
  grid = dict(k_grid=(1, 4), sigma_grid=(1.0,), temperature_grid=(1.0,), progress=False)
  fitted = resmem_jax.fit(model, train=train, validation=validation, **grid)
  keys = rng.normal(size=(300, 8)).astype(np.float32)
  res = resmem_jax.residuals(rng.integers(0, 5, 300), rng.normal(size=(300, 5)).astype(np.float32))
  memory = resmem_jax.build_memory(keys, res)
  base = np.full((4, 5), 0.2, np.float32)
  err = expect_error

  def fit_with(**changes):
    splits = {"train": train, "validation": validation, **changes}
    return lambda: resmem_jax.fit(model, **splits, **grid)

  def fit_options(**options):
    return lambda: resmem_jax.fit(model, train=train, validation=validation, **{**grid, **options})

  def scann(n=300, **options):
    return lambda: resmem_jax.build_memory(keys[:n], res[:n], backend="scann", **options)

  def wide_labels(labels):  # int64 ids past int32: a cast would wrap them to valid-looking ids
    return labels.astype(np.int64) + 2**32

  def empty_predict():
    out = fitted.predict(x[:0])
    assert out.shape == (0,), f"shape {out.shape}"
    return "shape (0,): no rows, no predictions"

  return [
      ("fit: validation labels + 10", lambda: err(fit_with(
          validation=(validation[0], validation[1] + 10)))),
      ("fit: validation labels -1", lambda: err(fit_with(
          validation=(validation[0], validation[1] * 0 - 1)))),
      ("fit: int64 validation labels + 2**32", lambda: err(fit_with(
          validation=(validation[0], wide_labels(validation[1]))))),
      ("fit: train labels + 10", lambda: err(fit_with(train=(train[0], train[1] + 10)))),
      ("fit: validation labels + 10 in batches", lambda: err(fit_with(
          validation=[(validation[0], validation[1] + 10)]))),
      ("fit: whole-number float labels", lambda: err(fit_with(train=(train[0], train[1] * 1.0)))),
      ("fit: empty train", lambda: err(fit_with(train=(x[:0], y[:0])))),
      ("fit: empty validation", lambda: err(fit_with(validation=(x[:0], y[:0])))),
      ("fit: train batches all empty", lambda: err(fit_with(train=[(x[:0], y[:0])]))),
      ("fit: k = 5000 (80 training rows)", lambda: err(fit_options(k=5000))),
      ("fit: k_grid = (5000,)", lambda: err(fit_options(k_grid=(5000,)))),
      ("fit: batch_size = 0", lambda: err(fit_options(batch_size=0))),
      ("fit: batch_size = 10**12", lambda: err(fit_options(batch_size=10**12))),
      ("fit: complex inputs", lambda: err(fit_with(train=(train[0] + 1j, train[1])))),
      ("evaluate: labels + 10", lambda: err(lambda: fitted.evaluate(test[0], test[1] + 10))),
      ("evaluate: labels -1", lambda: err(lambda: fitted.evaluate(test[0], test[1] * 0 - 1))),
      ("evaluate: int64 labels + 2**32", lambda: err(
          lambda: fitted.evaluate(test[0], wide_labels(test[1])))),
      ("evaluate: empty", lambda: err(lambda: fitted.evaluate(x[:0], y[:0]))),
      ("ResMem.predict: complex inputs", lambda: err(lambda: fitted.predict(test[0] + 1j))),
      ("ResMem.predict: 0 rows", lambda: expect_works(empty_predict)),
      ("predict: complex base", lambda: err(
          lambda: resmem_jax.predict(memory, base + 1j, keys[:4], 2, 1.0))),
      ("predict: complex queries", lambda: err(
          lambda: resmem_jax.predict(memory, base, keys[:4] + 1j, 2, 1.0))),
      ("predict: string queries", lambda: err(
          lambda: resmem_jax.predict(memory, base, keys[:4].astype(str), 2, 1.0))),
      ("regression residuals: complex targets", lambda: err(
          lambda: resmem_jax.regression_residuals(np.ones(3) + 1j, np.ones(3)))),
      ("build_memory: 0-dimensional keys", lambda: err(
          lambda: resmem_jax.build_memory(np.zeros((10, 0), np.float32), res[:10]))),
      ("build_memory: sparse residuals with 0 outputs", lambda: err(
          lambda: resmem_jax.build_memory(keys, res[:, :0], residual_format="sparse"))),
      ("scann: tree_ah over 5 keys", lambda: err(scann(5, mode="tree_ah"))),
      ("scann: training_sample_size = 1", lambda: err(scann(mode="tree_ah",
                                                            training_sample_size=1))),
      ("scann: reorder = 2**31", lambda: err(scann(mode="tree_ah", reorder=2**31))),
      ("scann: leaves_to_search = 2**40", lambda: err(scann(mode="tree_ah",
                                                            leaves_to_search=2**40))),
      ("scann: num_threads = 50000", lambda: err(scann(mode="tree_ah", num_threads=50_000))),
      ("JSON state: 100k nested brackets", lambda: err(lambda: jsonio.loads("[" * 100_000))),
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


# Settings that passed validation and failed later (issue 24): each must now end the tool with one
# line before any work (the last two after training started: the workdir exists by then).
BAD_SETTINGS = [
    ("--config.train.weight_decay=inf",), ("--config.train.num_epochs=inf",),
    ("--config.train.learning_rate=nan",), ("--config.seed=-1",),
    ("--config.seed=1180591620717411303424",), ("--config.data.split_seed=-1",),
    ("--config.data.split_seed=1099511627776",), ("--config.data.val_fraction=0.9999",),
    ("--config.resmem.k=5000",), ("--config.resmem.k_grid=(5000,)",),
    ("--config.model.width=1e9",), ("--config.train.eval_batch_size=1000000000",),
    ("--config.resmem.eval_batch_size=1000000000",),
    ("--config.resmem.backend_options=num_threads=50000",),
    ("--config.resmem.backend_options=mode=tree_ah,reorder=2147483648",),
    ("--config.resmem.backend_options=mode=tree_ah,training_sample_size=1",),
]
# Settings whose training diverges: stopped at the first logged NaN loss, in one line.
DIVERGING = [
    ("--config=digits:tiny", "--config.train.learning_rate=1e30"),
    ("--config=digits", "--config.train.learning_rate=5", "--config.train.dtype=float16"),
]


def settings_cases(tmp: pathlib.Path) -> list[tuple[str, Callable]]:
  cases = []
  for flags in BAD_SETTINGS:
    def case(flags=flags):
      workdir = tmp / f"settings{abs(hash(flags))}"
      return classify_binary(_binary([DIGITS, *flags], workdir), workdir)
    cases.append((" ".join(flags), case))
  for flags in DIVERGING:
    def case(flags=flags):
      workdir = tmp / f"diverging{abs(hash(flags))}"
      return classify_binary(_binary(list(flags), workdir), prefix="training error: ")
    cases.append((" ".join(flags), case))
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


def _tmpfs(folder: pathlib.Path, size_kb: int) -> bool:
  """Mounts a ``size_kb`` tmpfs at ``folder`` (needs root); False where that is not allowed."""
  folder.mkdir(parents=True, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                        capture_output=True, check=False).returncode == 0


def _unmount(folder: pathlib.Path) -> None:
  subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def state_cases(tmp: pathlib.Path) -> list[tuple[str, Callable]]:
  """State written as one unit (issue 24): mixed or foreign parts, two writers, OS faults."""
  import flax.linen as nn
  import jax
  import resmem_jax

  reference = tmp / "state_reference"
  if _binary([DIGITS], reference).returncode != 0:
    raise RuntimeError("the reference run failed")
  expected = _results(reference)
  counter = iter(range(1000))

  def fresh_copy() -> pathlib.Path:
    target = tmp / f"state{next(counter)}"
    shutil.copytree(reference, target)
    return target

  def two_at_once():
    workdir = tmp / f"state{next(counter)}"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    first = subprocess.Popen([sys.executable, "-m", "experiments.resmem", DIGITS,
                              f"--workdir={workdir}"], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = workdir / "run.lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (
        lock.is_file() and lock.read_text()):
      time.sleep(0.05)
    start = time.perf_counter()
    second = _binary([DIGITS], workdir)
    waited = time.perf_counter() - start
    _, first_err = first.communicate(timeout=300)
    if first.returncode != 0:
      return "UNCLEAR", f"the first run failed: {first_err.strip()[-250:]}"
    outcome, detail = classify_binary(second, prefix="workdir error: ")
    return outcome, f"{detail} (after {waited:.0f} s)"

  def foreign_checkpoint():
    workdir, other = fresh_copy(), tmp / f"state{next(counter)}"
    proc = _binary([DIGITS, "--config.train.num_epochs=3", "--config.train.learning_rate=0.01"],
                   other)
    assert proc.returncode == 0, proc.stderr[-300:]
    step = max((p for p in (other / "checkpoints").iterdir() if p.name.isdigit()),
               key=lambda p: int(p.name))
    shutil.copytree(step, workdir / "checkpoints" / step.name)
    return classify_binary(_binary([DIGITS], workdir), prefix="workdir error: ")

  def memory_of_another_run():
    workdir, other = fresh_copy(), fresh_copy()
    proc = _binary([DIGITS, "--config.resmem.temperature_grid=(2.0,)"], other)
    assert proc.returncode == 0, proc.stderr[-300:]
    shutil.rmtree(workdir / "memory" / "index")  # the new memory beside the old state
    shutil.copytree(other / "memory" / "index", workdir / "memory" / "index")
    proc = _binary([DIGITS], workdir)
    if proc.returncode != 0:
      return classify_binary(proc)
    if _results(workdir) != expected:
      return "SILENT", "the other run's memory served with this run's choice"
    return "recovered", "the state names another memory: set aside, rebuilt, identical results"

  def fifo_in_memory():
    workdir = fresh_copy()
    (workdir / "memory" / "index" / "residuals.npy").unlink()
    os.mkfifo(workdir / "memory" / "index" / "residuals.npy")
    try:
      proc = _binary([DIGITS], workdir, timeout=120)
    except subprocess.TimeoutExpired:
      return "UNCLEAR", "the run blocked on the FIFO"
    if proc.returncode != 0:
      return classify_binary(proc)
    if _results(workdir) != expected:
      return "SILENT", "results differ from the undamaged run"
    return "recovered", "the memory with a FIFO was set aside and rebuilt, identical results"

  def os_fault(workdir_of, *flags):
    def case():
      workdir = workdir_of()
      return classify_binary(_binary([DIGITS, *flags], workdir), prefix="file error: ")
    return case

  def a_file(name):
    def make():
      path = tmp / f"{name}{next(counter)}"
      path.write_text("a user's file")
      return path
    return make

  def read_only():
    mount = tmp / f"ro{next(counter)}"
    if not _tmpfs(mount, 64 * 1024):
      return "works", "skipped: mounting a file system needs root"
    try:
      shutil.copytree(reference, mount / "run")
      subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
      return classify_binary(_binary([DIGITS], mount / "run"), prefix="file error: ")
    finally:
      _unmount(mount)

  def disk_full(backend):
    def case():
      mount = tmp / f"full{next(counter)}"
      size = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file()) // 1024
      if not _tmpfs(mount, size + 512):
        return "works", "skipped: mounting a file system needs root"
      try:
        shutil.copytree(reference, mount / "run")
        info = os.statvfs(mount)
        (mount / "filler").write_bytes(b"\0" * max(0, info.f_bavail * info.f_frsize - 48 * 1024))
        # A memory rebuild (the temperature grid changed) then finds no space for the memory.
        return classify_binary(_binary([DIGITS, f"--config.resmem.backend={backend}",
                                        "--config.resmem.temperature_grid=(2.0,)"], mount / "run"),
                               prefix="file error: ")
      finally:
        _unmount(mount)
    return case

  class Net(nn.Module):
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
      hidden = self.activation(nn.Dense(8)(x))
      return nn.Dense(3)(hidden), hidden

  rng = np.random.default_rng(2)
  x = rng.normal(size=(200, 5)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)
  model = Net()
  variables = model.init(jax.random.key(0), x[:1])
  fixed = dict(k=3, sigma=0.7, temperature=1.0, base_mix=0.0, progress=False)
  fits = [resmem_jax.fit(model, variables, train=(x[:100], y[:100]), **fixed),
          resmem_jax.fit(model, variables, train=(x[100:], y[100:]), **fixed)]

  def saved(which=0):
    path = tmp / f"resmem{next(counter)}"
    fits[which].save(path)
    return path

  def load_other_architecture():
    resmem_jax.ResMem.load(saved(), Net(activation=nn.tanh), variables)

  def load_memory_of_another_fit():
    path, other = saved(0), saved(1)
    shutil.rmtree(path / "memory")
    shutil.copytree(other / "memory", path / "memory")
    resmem_jax.ResMem.load(path, model, variables)

  def save_onto_users_folder():
    path = tmp / f"user{next(counter)}"
    path.mkdir()
    (path / "resmem.json").write_text('{"my": "notes"}')
    try:
      fits[0].save(path)
    finally:
      assert (path / "resmem.json").read_text() == '{"my": "notes"}', "the user's file was touched"

  def save_over_earlier_save():
    path = saved(0)
    fits[1].save(path)
    loaded = resmem_jax.ResMem.load(path, model, variables)
    assert np.array_equal(loaded.memory.keys, fits[1].memory.keys), "not the new save"
    return "replaced as one unit; the new save loads"

  def memory_onto_users_names():
    path = tmp / f"user{next(counter)}"
    (path / "index").mkdir(parents=True)
    (path / "manifest.json").write_text('{"name": "my web app"}')
    (path / "keys.npy").write_bytes(b"mine")
    try:
      fits[0].memory.save(path)
    finally:
      assert (path / "keys.npy").read_bytes() == b"mine", "the user's file was touched"

  def fifo_load():
    path = saved()
    (path / "memory" / "residuals.npy").unlink()
    os.mkfifo(path / "memory" / "residuals.npy")
    resmem_jax.load_memory(path / "memory")

  err = expect_error
  return [
      ("two identical commands in one workdir at once", two_at_once),
      ("rerun: a later checkpoint copied from another run", foreign_checkpoint),
      ("cache: memory/index from another run beside this state", memory_of_another_run),
      ("cache: a FIFO in place of memory/index/residuals.npy", fifo_in_memory),
      ("workdir is a file", os_fault(a_file("file"))),
      ("workdir's parent is a file", os_fault(lambda: a_file("parent")() / "run")),
      ("workdir on a read-only file system", read_only),
      ("disk full during the memory save (exact)", disk_full("exact")),
      ("disk full during the memory save (scann)", disk_full("scann")),
      ("ResMem.load: same variables, tanh instead of relu", lambda: err(load_other_architecture)),
      ("ResMem.load: memory/ copied from another fit", lambda: err(load_memory_of_another_fit)),
      ("ResMem.save: onto a folder with the user's resmem.json", lambda: err(
          save_onto_users_folder)),
      ("ResMem.save: over an earlier save", lambda: expect_works(save_over_earlier_save)),
      ("Memory.save: onto manifest.json, keys.npy, index/ of the user's", lambda: err(
          memory_onto_users_names)),
      ("load_memory: a FIFO in place of residuals.npy", lambda: err(fifo_load)),
  ]


def run_catalogue(kills: int = 12, log: Callable[[str], None] = print) -> list[Outcome]:
  """Every case; returns the outcomes in order (areas: API, inputs, save/load, binary flags and
  settings, workdir, kill)."""
  outcomes = []
  with tempfile.TemporaryDirectory(prefix="resmem_faults_") as tmp_name:
    tmp = pathlib.Path(tmp_name)
    areas = [("public API", api_cases()), ("inputs", input_cases()),
             ("memory save/load", save_cases(tmp)), ("binary flags", binary_cases(tmp)),
             ("binary settings", settings_cases(tmp)), ("workdir", workdir_cases(tmp)),
             ("kill and rerun", kill_cases(tmp, kills)), ("state as one unit", state_cases(tmp))]
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
