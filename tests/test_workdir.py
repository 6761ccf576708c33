"""Numbers you can trust: workdir provenance, caches keyed by content, recovery from bad files."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from resmem_jax import settings as settings_lib
from resmem_jax.jobs import engine
from resmem_jax.training import checkpoints, provenance


def _digits(**changes):
  from resmem_jax.configs import digits
  cfg = digits.get_config("tiny")
  cfg.resmem.backend = "exact"
  cfg.resmem.k_grid = (1, 4)
  cfg.resmem.sigma_grid = (0.5, 2.0)
  cfg.resmem.temperature_grid = (1.0,)
  cfg.resmem.timing_repeats = 1
  for path, value in changes.items():
    section, name = path.split("__")
    cfg[section][name] = value
  return settings_lib.from_config(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained") / "run"
  return workdir, engine.run(_digits(), workdir, progress=False)


@pytest.fixture()
def copy(trained, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(trained[0], target)
  return target, trained[1]


def _snapshot(folder):
  return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
          for p in folder.rglob("*") if p.is_file()}


def test_first_run_records_settings_versions_and_model_digest(trained):
  workdir, results = trained
  record = json.loads((workdir / "run.json").read_text())
  assert record["model_fields"]["train.learning_rate"] == 0.05
  assert "resmem.k_grid" not in record["model_fields"]  # memory fields are free to change
  assert record["versions"]["jax"] and record["settings"]["resmem"]["k_grid"] == [1, 4]
  assert record["checkpoint"]["digest"] == results["model_digest"]
  assert len(results["model_digest"]) == 64 and results["config"]["train"]["learning_rate"] == 0.05


def test_rerun_with_a_changed_learning_rate_is_refused_before_any_work(copy):
  workdir, _ = copy
  before = _snapshot(workdir)
  with pytest.raises(provenance.WorkdirError, match=r"train.learning_rate: 0.05 -> 0.01.*start_over"):
    engine.run(_digits(train__learning_rate=0.01), workdir, progress=False)
  assert _snapshot(workdir) == before  # nothing written, nothing trained


def test_memory_and_bookkeeping_fields_change_freely(copy):
  workdir, first = copy
  log_every = engine.run(_digits(train__log_every_steps=7), workdir, progress=False)
  assert log_every["memory"]["reused"] and log_every["model_digest"] == first["model_digest"]
  wider = engine.run(_digits(resmem__k_grid=(1, 2, 4)), workdir, progress=False)
  assert not wider["memory"]["reused"]  # rebuilt: its settings changed
  assert wider["model_digest"] == first["model_digest"]  # the same model, not retrained
  assert wider["base"] == first["base"]


def test_start_over_moves_the_earlier_run_aside_and_trains_again(copy):
  workdir, first = copy
  old = _snapshot(workdir)
  results = engine.run(_digits(train__learning_rate=0.01), workdir, progress=False,
                       start_over=True)
  superseded = list((workdir / "superseded").iterdir())
  assert len(superseded) == 1
  assert _snapshot(superseded[0]) == {k: v for k, v in old.items()}  # moved intact, not deleted
  assert results["model_digest"] != first["model_digest"]
  assert json.loads((workdir / "run.json").read_text())["model_fields"]["train.learning_rate"] == 0.01


def test_retraining_after_deleting_checkpoints_rebuilds_the_memory(copy):
  workdir, first = copy
  shutil.rmtree(workdir / "checkpoints")
  # No trained model is left, so new model settings are allowed; the memory of the old model must
  # not serve the new one.
  changed = engine.run(_digits(train__learning_rate=0.01), workdir, progress=False)
  assert changed["memory"]["reused"] is False
  assert changed["model_digest"] != first["model_digest"]
  shutil.rmtree(workdir / "checkpoints")
  # Retraining with the original settings gives the bit-identical model (training is
  # deterministic); the memory is keyed by that content, so it is rebuilt for it and matches.
  again = engine.run(_digits(), workdir, progress=False)
  assert again["model_digest"] == first["model_digest"] and not again["memory"]["reused"]
  assert again["resmem"]["test_accuracy"] == first["resmem"]["test_accuracy"]


def _checkpoint_files(workdir):
  step = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  folder = workdir / "checkpoints" / str(step) / "variables"
  return sorted((p for p in folder.rglob("*") if p.is_file() and p.stat().st_size > 64),
                key=lambda p: -p.stat().st_size)


def test_a_changed_checkpoint_is_refused_with_one_clear_message(copy):
  workdir, _ = copy
  data = _checkpoint_files(workdir)[0]
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0x40
  data.write_bytes(bytes(raw))
  with pytest.raises((provenance.WorkdirError, checkpoints.CheckpointError),
                     match=r"checkpoints/\d+.*(changed after training|cannot read)"):
    engine.run(_digits(), workdir, progress=False)


def test_a_truncated_checkpoint_names_the_folder_and_the_fix(copy):
  workdir, _ = copy
  for path in _checkpoint_files(workdir):
    path.write_bytes(path.read_bytes()[:16])
  with pytest.raises((checkpoints.CheckpointError, provenance.WorkdirError),
                     match=r"checkpoints/\d+.*(move that folder|start_over)"):
    engine.run(_digits(), workdir, progress=False)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"settings": {}}'])
def test_an_unreadable_run_record_is_one_clear_message(copy, content):
  workdir, _ = copy
  (workdir / "run.json").write_text(content)
  with pytest.raises(provenance.WorkdirError, match=r"run.json cannot be read.*start_over"):
    engine.run(_digits(), workdir, progress=False)


def test_a_trained_model_without_a_record_is_refused(copy):
  workdir, _ = copy
  (workdir / "run.json").unlink()
  with pytest.raises(provenance.WorkdirError, match="no run.json"):
    engine.run(_digits(), workdir, progress=False)


@pytest.mark.parametrize("damage", ["truncate_keys", "state_json", "manifest"])
def test_unreadable_caches_are_recomputed_with_identical_results(copy, damage):
  workdir, first = copy
  index = workdir / "memory" / "index"
  if damage == "truncate_keys":
    keys = index / "keys.npy"
    keys.write_bytes(keys.read_bytes()[:100])
  elif damage == "state_json":
    (workdir / "memory" / "resmem.json").write_text("{trunc")
  else:
    (index / "manifest.json").write_text("garbage")
  results = engine.run(_digits(), workdir, progress=False)
  assert results["memory"]["reused"] is False
  for head in ("base", "resmem"):
    assert results[head] == first[head]
  assert results["hparams"] == first["hparams"]
  assert list(workdir.glob("memory.unreadable-*"))  # the damaged cache was set aside, not deleted


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_follow_the_umask(tmp_path, mask):
  old = os.umask(mask)
  try:
    workdir = tmp_path / "run"
    engine.run(_digits(), workdir, progress=False)
  finally:
    os.umask(old)
  for name in ("results.json", "run.json", "model_info.json", "memory/resmem.json",
               "memory/index/manifest.json", "memory/index/keys.npy"):
    assert (workdir / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
  assert (workdir / "memory" / "index").stat().st_mode & 0o777 == 0o777 & ~mask


def test_binary_refuses_a_changed_model_in_one_line(copy):
  workdir, _ = copy
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.resmem", "--config=digits:tiny",
       f"--workdir={workdir}", "--config.train.learning_rate=0.01",
       "--config.resmem.backend=exact"],
      capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("workdir error: ") and "train.learning_rate" in last
