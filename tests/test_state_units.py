"""State written as one unit: a kill at every write of a memory rebuild or of ResMem.save leaves
the old whole or the new whole, and what is read back is cross-checked (the memory against the
state that names it, the model against the save's record)."""
import json
import os
import shutil

import numpy as np
import pytest
from conftest import run_python

# Patches the write primitives the saves use and kills the process at write number N (a fork
# child; the parent reads back what the kill left). Shared by both scripts below.
KILL_HOOK = """
import builtins, io, os, shutil, signal

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def kill_at(number):
  calls = [0]
  def counted(fn, is_write=lambda *a, **k: True):
    def call(*args, **kwargs):
      if is_write(*args, **kwargs):
        calls[0] += 1
        if calls[0] == number:
          os.kill(os.getpid(), signal.SIGKILL)
      return fn(*args, **kwargs)
    return call
  def open_for_write(file, mode="r", *args, **kwargs):
    return any(c in mode for c in "wax+")
  def os_open_for_write(path, flags, *args, **kwargs):
    return bool(flags & WRITE_FLAGS)
  builtins.open = io.open = counted(builtins.open, open_for_write)
  os.open = counted(os.open, os_open_for_write)
  for name in ("mkdir", "rename", "replace", "fsync", "unlink", "remove", "rmdir", "ftruncate"):
    setattr(os, name, counted(getattr(os, name)))
  shutil.rmtree = counted(shutil.rmtree)

def killed_at_every_write(save, check, limit=400):
  outcomes = []
  for number in range(1, limit):
    prepare()
    pid = os.fork()
    if pid == 0:
      try:
        kill_at(number)
        save()
      finally:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status)
    outcomes.append({"killed": killed, "read": check()})
    if not killed:
      return outcomes
  raise AssertionError("the save never completed")
"""

ENGINE_SCRIPT = KILL_HOOK + """
import json, logging, pathlib, warnings
warnings.simplefilter("ignore")  # os.fork with JAX loaded: the child only writes files
logging.getLogger("resmem_jax").setLevel(logging.ERROR)
from resmem_jax import settings as settings_lib
from resmem_jax.configs import digits
from resmem_jax import fitting
from resmem_jax.jobs import engine

def digits_settings(temperatures):
  cfg = digits.get_config("tiny")
  cfg.resmem.backend = "exact"
  cfg.resmem.k_grid = (1, 4)
  cfg.resmem.sigma_grid = (0.5, 2.0)
  cfg.resmem.temperature_grid = temperatures
  cfg.resmem.timing_repeats = 1
  return settings_lib.from_config(cfg)

root = pathlib.Path(os.environ["WORK"])
old_s, new_s = digits_settings((1.0,)), digits_settings((0.5, 2.0))
workdir = root / "run"
first = engine.run(old_s, workdir, progress=False)
mem_dir = workdir / "memory"
shutil.copytree(mem_dir, root / "old_unit")
_, _, passes = engine.trained_passes(new_s, workdir, progress=False)
old_sig = engine.memory_signature(old_s, passes.model.digest)
new_sig = engine.memory_signature(new_s, passes.model.digest)
old = engine._saved_memory(mem_dir, old_sig, False)
new = fitting.build_and_select(new_s.resmem, passes, "digits")
state = {"version": engine.STATE_VERSION, "signature": new_sig,
         "choice": new[1].to_json(), "tuning": new[2]}

def prepare():
  for name in os.listdir(workdir):
    if name.startswith((".memory", "memory")):
      full = workdir / name
      shutil.rmtree(full) if full.is_dir() else full.unlink()
  shutil.copytree(root / "old_unit", mem_dir)

def same(a, b):
  return (a is not None and a[1] == b[1] and np.array_equal(a[0].keys, b[0].keys)
          and np.array_equal(a[0].gather_residuals(np.arange(a[0].size)),
                             b[0].gather_residuals(np.arange(b[0].size))))

def check():
  as_old = engine._saved_memory(mem_dir, old_sig, False)  # what a rerun of each command reuses
  as_new = engine._saved_memory(mem_dir, new_sig, False)
  return {"old": same(as_old, old) if as_old else None, "new": same(as_new, new) if as_new else None,
          "beside": sorted(n for n in os.listdir(workdir) if n.startswith((".memory", "memory."))),
          "unreadable": any(n.startswith("memory.") for n in os.listdir(workdir))}

import numpy as np
outcomes = killed_at_every_write(lambda: engine.save_memory_unit(mem_dir, new[0], state), check)
# A rerun of each command after a kill in the middle of the save gives a clean run's results.
middle = len(outcomes) // 2
prepare()
pid = os.fork()
if pid == 0:
  kill_at(middle)
  engine.save_memory_unit(mem_dir, new[0], state)
  os._exit(0)
os.waitpid(pid, 0)
reruns = {name: engine.run(s, workdir, progress=False) for name, s in (("old", old_s), ("new", new_s))}
shutil.copytree(workdir, root / "clean", ignore=shutil.ignore_patterns("memory*", ".memory*"))
clean_new = engine.run(new_s, root / "clean", progress=False)
pick = lambda r: {h: r[h] for h in ("base", "resmem", "hparams")}
print("RESULT" + json.dumps({"outcomes": outcomes,
                             "old_equal": pick(reruns["old"]) == pick(first),
                             "new_equal": pick(reruns["new"]) == pick(clean_new),
                             "differ": pick(first) != pick(clean_new)}))
"""


@pytest.mark.slow
def test_a_memory_rebuild_killed_at_every_write_leaves_the_old_unit_or_the_new(tmp_path):
  out = run_python(ENGINE_SCRIPT, timeout=600, env={"WORK": str(tmp_path)})
  result = json.loads(out.stdout.split("RESULT")[-1])
  outcomes = result["outcomes"]
  assert len(outcomes) >= 15 and not outcomes[-1]["killed"]
  seen = []
  for number, outcome in enumerate(outcomes, 1):
    read = outcome["read"]
    # Each command's rerun reuses its own whole unit or nothing: never the new memory with the
    # old choice (or the reverse), and never an unreadable unit set aside.
    assert read["old"] in (True, None) and read["new"] in (True, None), (number, outcome)
    assert (read["old"] is None) != (read["new"] is None), (number, outcome)
    assert not read["unreadable"], (number, outcome)
    seen.append("new" if read["new"] else "old")
  assert seen == sorted(seen, key=lambda x: x == "new") and seen[0] == "old" and seen[-1] == "new"
  assert result["differ"]  # the two commands really give different results
  assert result["old_equal"] and result["new_equal"]


RESMEM_SCRIPT = KILL_HOOK + """
import json, logging, pathlib, warnings
warnings.simplefilter("ignore")
import flax.linen as nn
import jax
import numpy as np
import resmem_jax

class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8)(x))
    return nn.Dense(3)(h), h

rng = np.random.default_rng(0)
x = rng.normal(size=(240, 5)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)
model = Net()
variables = model.init(jax.random.key(0), x[:1])
old = resmem_jax.fit(model, variables, train=(x[:120], y[:120]), validation=(x[200:], y[200:]),
                     progress=False)
new = resmem_jax.fit(model, variables, train=(x[60:200], y[60:200]), k=3, sigma=0.7,
                     temperature=2.0, base_mix=0.0, progress=False)
root = pathlib.Path(os.environ["WORK"])
path = root / "saved"
old.save(root / "old_copy")

def prepare():
  for name in os.listdir(root):
    if name != "old_copy":
      full = root / name
      shutil.rmtree(full) if full.is_dir() else full.unlink()
  shutil.copytree(root / "old_copy", path)

def same(a, b):
  return (a.hparams == b.hparams and np.array_equal(a.memory.keys, b.memory.keys)
          and np.array_equal(a.memory.gather_residuals(np.arange(a.memory.size)),
                             b.memory.gather_residuals(np.arange(b.memory.size))))

def check():
  try:
    loaded = resmem_jax.ResMem.load(path, model, variables)
  except ValueError as err:
    return "error: " + str(err)
  return "old" if same(loaded, old) else "new" if same(loaded, new) else "mix"

outcomes = killed_at_every_write(lambda: new.save(path), check)
print("RESULT" + json.dumps(outcomes))
"""


def test_resmem_save_killed_at_every_write_loads_the_old_save_or_the_new(tmp_path):
  out = run_python(RESMEM_SCRIPT, timeout=600, env={"WORK": str(tmp_path)})
  outcomes = json.loads(out.stdout.split("RESULT")[-1])
  assert len(outcomes) >= 15 and not outcomes[-1]["killed"]
  read = [o["read"] for o in outcomes]
  assert set(read) <= {"old", "new"}, read
  assert read == sorted(read, key=lambda x: x == "new") and read[0] == "old" and read[-1] == "new"


# -- ResMem.save / load: what it replaces, what it loads ------------------------------------------
@pytest.fixture(scope="module")
def fitted():
  import flax.linen as nn
  import jax
  import resmem_jax

  class Net(nn.Module):
    activation: object = nn.relu

    @nn.compact
    def __call__(self, x):
      h = self.activation(nn.Dense(8)(x))
      return nn.Dense(3)(h), h

  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 5)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)
  model = Net()
  variables = model.init(jax.random.key(0), x[:1])
  fixed = dict(k=3, sigma=0.7, temperature=1.0, base_mix=0.0, progress=False)
  first = resmem_jax.fit(model, variables, train=(x[:100], y[:100]), **fixed)
  second = resmem_jax.fit(model, variables, train=(x[100:], y[100:]), **fixed)
  return Net, model, variables, first, second


def test_resmem_load_refuses_another_architecture_with_the_same_variables(fitted, tmp_path):
  import flax.linen as nn
  import resmem_jax
  net, model, variables, first, _ = fitted
  first.save(tmp_path / "s")
  assert resmem_jax.ResMem.load(tmp_path / "s", model, variables).hparams == first.hparams
  with pytest.raises(ValueError, match=r"another model architecture \(saved .*relu.*this model "
                                       r".*tanh.*fit again"):
    resmem_jax.ResMem.load(tmp_path / "s", net(activation=nn.tanh), variables)


def test_resmem_load_refuses_a_memory_copied_from_another_fit(fitted, tmp_path):
  import resmem_jax
  _, model, variables, first, second = fitted
  first.save(tmp_path / "a")
  second.save(tmp_path / "b")
  shutil.rmtree(tmp_path / "a" / "memory")
  shutil.copytree(tmp_path / "b" / "memory", tmp_path / "a" / "memory")
  with pytest.raises(ValueError, match=r"memory in .*a/memory is not the one .*resmem.json names"):
    resmem_jax.ResMem.load(tmp_path / "a", model, variables)


def test_resmem_save_refuses_a_folder_of_the_users_files_untouched(fitted, tmp_path):
  _, _, _, first, second = fitted
  user = tmp_path / "mine"
  user.mkdir()
  (user / "resmem.json").write_text('{"my": "settings"}')
  (user / "notes.txt").write_text("years of work")
  with pytest.raises(ValueError, match=r"cannot save a ResMem to .*mine: the folder holds "
                                       r"notes.txt, which no earlier ResMem.save wrote"):
    first.save(user)
  (user / "notes.txt").unlink()
  with pytest.raises(ValueError, match="which no earlier ResMem.save wrote"):  # not our state
    first.save(user)
  assert sorted(os.listdir(user)) == ["resmem.json"]
  assert (user / "resmem.json").read_text() == '{"my": "settings"}'
  # An earlier save is replaced as a whole, and nothing is left beside it.
  first.save(tmp_path / "s")
  second.save(tmp_path / "s")
  assert sorted(os.listdir(tmp_path / "s")) == ["memory", "resmem.json"]
  assert sorted(n for n in os.listdir(tmp_path) if "s" in n) == ["s"]


def test_an_older_resmem_save_still_loads(fitted, tmp_path, caplog):
  import resmem_jax
  _, model, variables, first, _ = fitted
  first.save(tmp_path / "s")
  state_path = tmp_path / "s" / "resmem.json"
  state = json.loads(state_path.read_text())
  for name in ("format_version", "memory_manifest_sha256", "model_architecture",
               "model_architecture_sha256"):
    state.pop(name)
  state_path.write_text(json.dumps(state))
  loaded = resmem_jax.ResMem.load(tmp_path / "s", model, variables)
  assert loaded.hparams == first.hparams and "saved by an older resmem_jax" in caplog.text
