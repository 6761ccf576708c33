"""Numbers you can trust: workdir provenance, caches keyed by content, recovery from bad files."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

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
  # run.lock names the run holding the workdir (workdir_lock.py): every run rewrites it.
  return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
          for p in folder.rglob("*") if p.is_file() and p.name != "run.lock"}


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


def _with_new_field(section: str, affects: str, value: int):
  """Settings whose ``section`` has one more field, declared like any other: no list edited."""
  base = type(getattr(settings_lib.Settings(), section))
  knob = dataclasses.field(default=1, metadata={"help": "a field added later", "affects": affects})
  extended = dataclasses.make_dataclass(f"Extended{base.__name__}", [("new_knob", int, knob)],
                                        bases=(base,), frozen=True)
  return dataclasses.replace(settings_lib.Settings(), **{section: extended(new_knob=value)})


def test_a_new_field_reaches_the_memory_signature_and_the_record_by_its_declaration(tmp_path):
  def signature(s):
    return engine.memory_signature(s, "0" * 64)

  # A new resmem.* field: the memory is rebuilt when it changes, the model is kept.
  one, two = _with_new_field("resmem", "memory", 1), _with_new_field("resmem", "memory", 2)
  assert signature(one)["resmem"]["new_knob"] == 1 and signature(one) != signature(two)
  assert provenance.model_fields(one) == provenance.model_fields(two)
  # A new field that changes the model: recorded in run.json, a change refused, and in the
  # memory's signature too.
  one, two = _with_new_field("train", "model", 1), _with_new_field("train", "model", 2)
  assert provenance.model_fields(one)["train.new_knob"] == 1 and signature(one) != signature(two)
  workdir = tmp_path / "run"
  provenance.prepare(workdir, one)
  (workdir / provenance.CHECKPOINT_DIR / "1").mkdir(parents=True)  # "a trained model"
  with pytest.raises(provenance.WorkdirError, match=r"train.new_knob: 1 -> 2"):
    provenance.prepare(workdir, two)
  # A field that changes neither: free, and the saved memory still serves.
  one, two = _with_new_field("train", "report", 1), _with_new_field("train", "report", 2)
  assert signature(one) == signature(two)
  assert provenance.model_fields(one) == provenance.model_fields(two)


def test_the_signature_keeps_the_earlier_places_of_earlier_fields():
  s = settings_lib.Settings()
  signature = engine.memory_signature(s, "0" * 64)
  assert signature["data"]["name"] == s.data.name and signature["model_digest"] == "0" * 64
  assert signature["resmem"]["k_grid"] == list(s.resmem.k_grid)
  assert "eval_batch_size" not in signature["resmem"] and "data_dir" not in signature["data"]


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


def test_a_checkpoint_from_another_run_is_refused_whatever_its_step(copy, tmp_path):
  workdir, _ = copy
  other = tmp_path / "other"
  engine.run(_digits(train__num_epochs=3, train__learning_rate=0.01), other, progress=False)
  steps = [p.name for p in (other / "checkpoints").iterdir() if p.name.isdigit()]
  foreign = max(steps, key=int)
  assert int(foreign) > max(int(p.name) for p in (workdir / "checkpoints").iterdir()
                            if p.name.isdigit())
  shutil.copytree(other / "checkpoints" / foreign, workdir / "checkpoints" / foreign)
  before = json.loads((workdir / "run.json").read_text())
  with pytest.raises(provenance.WorkdirError,
                     match=rf"checkpoints/{foreign} was not written by the run recorded in "
                           r".*run.json.*move that folder out of .*checkpoints, or pass --start_over"):
    engine.run(_digits(), workdir, progress=False)
  assert json.loads((workdir / "run.json").read_text()) == before  # no digest re-recorded


def test_the_record_holds_the_digest_of_every_checkpoint_written(trained):
  workdir, results = trained
  record = json.loads((workdir / "run.json").read_text())
  on_disk = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert set(on_disk) <= set(record["checkpoints"])
  assert record["checkpoints"][str(results["checkpoint_step"])] == results["model_digest"]


def test_a_memory_copied_from_another_run_is_rebuilt_not_served(copy, tmp_path):
  workdir, first = copy
  other = tmp_path / "other"
  shutil.copytree(workdir, other)
  engine.run(_digits(resmem__temperature_grid=(2.0,)), other, progress=False)  # same model
  shutil.rmtree(workdir / "memory" / "index")
  shutil.copytree(other / "memory" / "index", workdir / "memory" / "index")
  results = engine.run(_digits(), workdir, progress=False)
  assert results["memory"]["reused"] is False  # the state names another memory: set aside
  assert {h: results[h] for h in ("base", "resmem", "hparams")} == {
      h: first[h] for h in ("base", "resmem", "hparams")}
  assert list(workdir.glob("memory.unreadable-*"))


def test_an_older_memory_unit_is_set_aside_and_rebuilt(copy):
  workdir, first = copy
  state_path = workdir / "memory" / "resmem.json"
  state = json.loads(state_path.read_text())
  del state["version"], state["memory"]
  state_path.write_text(json.dumps(state))
  results = engine.run(_digits(), workdir, progress=False)
  assert results["memory"]["reused"] is False and results["resmem"] == first["resmem"]
  assert list(workdir.glob("memory.older-*"))
  assert engine.run(_digits(), workdir, progress=False)["memory"]["reused"]


HOLD_THE_LOCK = """
import sys, time
from resmem_jax.training import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print("held", flush=True)
  time.sleep(120)
"""


def test_one_writer_per_workdir_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
  from resmem_jax.training import workdir_lock
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path / "w")],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(workdir_lock.WorkdirInUse,
                       match=rf"w is in use by another run \(pid {holder.pid} on host .+ since "
                             r".+\): one run per workdir; wait for it to finish, or use another"):
      with workdir_lock.hold(tmp_path / "w"):
        pass
  finally:
    holder.kill()
    holder.wait()
  with workdir_lock.hold(tmp_path / "w"):  # released by the OS with its process
    with workdir_lock.hold(tmp_path / "w"):  # re-entrant within one process
      pass
  with workdir_lock.hold(tmp_path / "w", process_index=1):  # another process of the same job
    pass


@pytest.mark.slow
def test_two_identical_commands_in_one_workdir_one_runs_one_refuses_at_once(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, "-m", "experiments.resmem", "--config=digits:tiny",
             f"--workdir={workdir}", "--config.resmem.backend=exact"]
  first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=REPO_ROOT, env=env)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and not (workdir / "run.lock").is_file() or not (
        workdir / "run.lock").read_text():
      assert first.poll() is None, first.communicate()
      time.sleep(0.05)
    start = time.perf_counter()
    second = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                            timeout=120)
    assert time.perf_counter() - start < 60
    out, err = first.communicate(timeout=300)
  finally:
    first.kill()
  lines = [l for l in second.stderr.splitlines() if l.strip()]
  assert second.returncode != 0 and len(lines) == 1, second.stderr[-2000:]
  assert lines[0].startswith(f"workdir error: {workdir} is in use by another run (pid "
                             f"{first.pid} on host "), lines[0]
  assert first.returncode == 0, err[-2000:]
  records = [l for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(records) == len(set(records))  # no record written twice
