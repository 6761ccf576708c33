"""Saving never destroys: kills at any instant leave the old or the new memory, debris is cleaned,
foreign paths are refused untouched, concurrent saves take turns, permissions follow the umask."""
import hashlib
import json
import os
import select
import shutil
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import REPO_ROOT, run_python

from resmem_jax.memory import build_memory, load_memory

KILL_TIMEOUT_S = 60


def _memory(seed, n=200, d=4, classes=3, backend="exact", **options):
  rng = np.random.default_rng(seed)
  return build_memory(rng.standard_normal((n, d), dtype=np.float32),
                      rng.standard_normal((n, classes), dtype=np.float32), backend=backend,
                      labels=rng.integers(0, classes, n), metadata={"seed": seed}, **options)


def _same(a, b) -> bool:
  return (a.size == b.size and np.array_equal(a.keys, b.keys)
          and np.array_equal(a.labels, b.labels) and a.metadata == b.metadata
          and np.array_equal(a.gather_residuals(np.arange(a.size)),
                             b.gather_residuals(np.arange(b.size))))


def _tree_digest(root) -> dict:
  """Every entry under ``root`` (and ``root`` itself): kind, mode and content hash."""
  out = {}
  for folder, dirs, names in os.walk(root):
    for name in dirs + names + ([""] if folder == str(root) else []):
      full = os.path.join(folder, name)
      info = os.lstat(full)
      content = ""
      if stat.S_ISREG(info.st_mode):
        with open(full, "rb") as f:
          content = hashlib.sha256(f.read()).hexdigest()
      elif stat.S_ISLNK(info.st_mode):
        content = os.readlink(full)
      out[os.path.relpath(full, root)] = (stat.S_IFMT(info.st_mode), info.st_mode, content)
  return out


def _child_env():
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


SAVE_FOREVER = """
import sys
from resmem_jax.memory import load_memory
target, sources = sys.argv[1], sys.argv[2:]
memories = [load_memory(source) for source in sources]
print("saving", flush=True)
for i in range(10 ** 9):
  memories[i % len(memories)].save(target)
"""


@pytest.mark.slow
def test_sigkill_at_random_instants_leaves_the_old_or_the_new_memory(tmp_path):
  # Two memories of about 17 MB each (keys 30,000 x 128), so a kill lands inside a save.
  old, new = (_memory(seed, n=30_000, d=128, classes=16) for seed in (0, 1))
  for name, memory in (("old", old), ("new", new)):
    memory.save(tmp_path / name)
  target_dir = tmp_path / "target"
  path = target_dir / "mem"
  start = time.perf_counter()
  old.save(path)
  save_seconds = time.perf_counter() - start
  rng = np.random.default_rng(0)
  inside_a_save = 0
  for kill in range(20):
    with open(tmp_path / "child.err", "w") as err:
      child = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path),
                                str(tmp_path / "new"), str(tmp_path / "old")],
                               stdout=subprocess.PIPE, stderr=err, env=_child_env(),
                               cwd=str(REPO_ROOT))
    try:
      ready, _, _ = select.select([child.stdout], [], [], KILL_TIMEOUT_S)
      assert ready and child.stdout.readline() == b"saving\n", (tmp_path / "child.err").read_text()
      time.sleep(rng.uniform(0, 2 * save_seconds))
      assert child.poll() is None, (tmp_path / "child.err").read_text()
    finally:
      child.kill()
      child.wait(timeout=KILL_TIMEOUT_S)
      child.stdout.close()
    inside_a_save += sorted(os.listdir(target_dir)) != ["mem"]  # its lock, copies or a gap
    loaded = load_memory(path)
    assert _same(loaded, old) or _same(loaded, new), f"kill {kill}: neither memory"
    old.save(path)  # the next save cleans up whatever the killed one left
    assert sorted(os.listdir(target_dir)) == ["mem"], f"kill {kill}"
    assert _same(load_memory(path), old)
  assert inside_a_save >= 15  # the kills really landed inside saves


KILL_AT_EVERY_STEP = """
import builtins, json, os, shutil, signal, warnings
import numpy as np
from resmem_jax.memory import build_memory, load_memory
warnings.simplefilter("ignore")  # JAX warns about os.fork; no child calls JAX
folder, refs = os.environ["MEMORY_FOLDER"], os.environ["REFERENCE_FOLDER"]
options = json.loads(os.environ["MEMORY_OPTIONS"])
n = options.pop("n")
path = os.path.join(folder, "mem")
if options.get("backend") == "scann":  # imported once here (seconds), not in every child
  from resmem_jax.memory import scann as scann_backend
  scann_backend._import_scann()
queries = np.random.default_rng(9).standard_normal((20, 4), dtype=np.float32)

def same(a, b):
  return np.array_equal(a.keys, b.keys) and np.array_equal(a.labels, b.labels) and \\
      np.array_equal(a.gather_residuals(np.arange(n)), b.gather_residuals(np.arange(n))) and \\
      all(np.array_equal(x, y) for x, y in zip(a.search(queries, 5), b.search(queries, 5)))

# Every step runs in a forked child of this process, which never runs a backend itself: ScaNN's
# threads do not survive a fork. ScaNN's builds differ run to run, so both memories are built
# once and saved as references.
def in_child(fn):
  read_end, write_end = os.pipe()
  pid = os.fork()
  if pid == 0:
    code = 1  # an exception must not run on as the parent
    try:
      os.close(read_end)
      os.write(write_end, json.dumps(fn()).encode())
      code = 0
    finally:
      os._exit(code)
  os.close(write_end)
  data = b""
  while chunk := os.read(read_end, 1 << 16):
    data += chunk
  os.close(read_end)
  _, status = os.waitpid(pid, 0)
  return (json.loads(data) if data else None), os.WIFSIGNALED(status)

def build_references():
  for seed, name in ((0, "old"), (1, "new")):
    rng = np.random.default_rng(seed)
    build_memory(rng.standard_normal((n, 4), dtype=np.float32),
                 rng.standard_normal((n, 3), dtype=np.float32), labels=rng.integers(0, 3, n),
                 **options).save(os.path.join(refs, name))
  load_memory(os.path.join(refs, "old")).save(path)

def save_new_killed_at(call_number):  # save `new`, killed just before file-system call number
  new = load_memory(os.path.join(refs, "new"))
  calls = [0]
  def counted(fn):
    def call(*args, **kwargs):
      calls[0] += 1
      if calls[0] == call_number:
        os.kill(os.getpid(), signal.SIGKILL)
      return fn(*args, **kwargs)
    return call
  for module, name in [(os, "open"), (os, "mkdir"), (os, "rename"), (os, "fsync"),
                       (os, "unlink"), (os, "remove"), (os, "rmdir"), (os, "scandir"),
                       (shutil, "rmtree"), (builtins, "open")]:
    setattr(module, name, counted(getattr(module, name)))
  new.save(path)

def check():  # what is at `path` now; then `old` is saved there again for the next step
  old, new = (load_memory(os.path.join(refs, name)) for name in ("old", "new"))
  gap = not os.path.exists(path)
  beside = sorted(name for name in os.listdir(folder) if name != "mem")
  loaded = load_memory(path)
  which = "old" if same(loaded, old) else "new" if same(loaded, new) else "neither"
  old.save(path)
  return {"gap": gap, "beside": beside, "loaded": which,
          "clean": os.listdir(folder) == ["mem"] and same(load_memory(path), old)}

in_child(build_references)
steps = []
while len(steps) < 200:
  _, killed = in_child(lambda: save_new_killed_at(len(steps) + 1))
  step, _ = in_child(check)
  steps.append(dict(step, killed=killed))
  if not killed:
    break
print("RESULT" + json.dumps(steps))
"""


# scann: a tree over AH codes, whose save packs the codes (resmem_jax/memory/scann_files.py) and
# reads the index back; every file it opens or removes is a kill point too.
@pytest.mark.parametrize("options", [{"n": 50}, {"n": 300, "backend": "scann", "mode": "tree_ah",
                                                 "num_leaves": 4, "reorder": 20}],
                         ids=["exact", "scann"])
def test_a_kill_before_any_file_system_call_of_a_save_leaves_a_loadable_memory(tmp_path, options):
  saves, refs = tmp_path / "saves", tmp_path / "refs"
  saves.mkdir()
  out = run_python(KILL_AT_EVERY_STEP, timeout=300,
                   env={"MEMORY_FOLDER": str(saves), "REFERENCE_FOLDER": str(refs),
                        "MEMORY_OPTIONS": json.dumps(options)})
  steps = json.loads(out.stdout.split("RESULT")[-1])
  assert not steps[-1]["killed"] and steps[-1]["loaded"] == "new"  # the save completed at last
  assert len(steps) >= 20
  for number, step in enumerate(steps, 1):
    assert step["loaded"] in ("old", "new") and step["clean"], (number, step)
  loaded = [step["loaded"] for step in steps]
  # The memory at `path` turns from old to new at one instant and stays new.
  assert loaded == sorted(loaded, key=lambda x: x == "new") and "old" in loaded
  assert any(step["gap"] for step in steps)  # killed between the two renames: put back on load
  assert any(any(".mem.tmp-" in name for name in step["beside"]) for step in steps)


def _leftover(path, kind, memory=None):
  """A folder named as a killed save leaves them (the documented naming)."""
  folder = path.parent / f".{path.name}.{kind}-{time.time_ns():x}-{os.getpid()}-0abc"
  if memory is not None:
    memory.save(folder)
  else:
    folder.mkdir()
  return folder


def test_a_gap_left_between_the_renames_is_filled_on_load(tmp_path):
  path = tmp_path / "mem"
  old, new = _memory(0), _memory(1)
  _leftover(path, "old", old)
  _leftover(path, "tmp", new)
  assert _same(load_memory(path), new)  # the complete new copy first
  assert sorted(os.listdir(tmp_path)) == ["mem"]
  # Without a complete new copy, the old one comes back.
  shutil.rmtree(path)
  _leftover(path, "old", old)
  (_leftover(path, "tmp", new) / "keys.npy").unlink()
  assert _same(load_memory(path), old)
  assert sorted(os.listdir(tmp_path)) == ["mem"]
  # Nothing to put back: no memory, and the incomplete copy is gone.
  shutil.rmtree(path)
  (_leftover(path, "tmp", new) / "manifest.json").unlink()
  with pytest.raises(FileNotFoundError, match="no memory folder at"):
    load_memory(path)
  assert os.listdir(tmp_path) == []


def test_the_next_save_deletes_only_its_own_debris(tmp_path):
  path = tmp_path / "mem"
  _memory(0).save(path)
  for kind in ("tmp", "old", "del"):
    _leftover(path, kind, _memory(1) if kind != "del" else None)
  (tmp_path / ".mem.lock").write_text("")  # left by a killed save
  others = [".mem.tmp-notours", ".other.tmp-1-2-3", "mem.tmp-1-2-3", ".mem.old-1-2-3.txt"]
  for name in others:
    (tmp_path / name).mkdir()
  (tmp_path / ".mem.tmp-1-2-4").write_text("a file, not a folder")
  others.append(".mem.tmp-1-2-4")
  assert _same(load_memory(path), _memory(0))  # loading leaves debris alone (path is intact)
  _memory(2).save(path)
  assert sorted(os.listdir(tmp_path)) == sorted(["mem"] + others)
  assert _same(load_memory(path), _memory(2))


@pytest.mark.parametrize("kind", ["file", "folder of other files", "symlink to a memory",
                                  "symlink to a file", "folder with only a manifest"])
def test_saving_onto_what_is_not_a_memory_is_refused_untouched(tmp_path, kind):
  path = tmp_path / "target"
  if kind == "file":
    path.write_bytes(b"important")
    message = "it is a file, not a memory folder"
  elif kind == "folder of other files":
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    (path / "figures").mkdir()
    (path / "figures" / "plot.png").write_bytes(b"\x89PNG")
    (path / "keys.npy").write_bytes(b"not a memory's")
    message = r"the folder is not a saved memory \(it holds figures, thesis.tex\)"
  elif kind.startswith("symlink"):
    real = tmp_path / "real"
    if kind == "symlink to a memory":
      _memory(0).save(real)
    else:
      real.write_text("x")
    path.symlink_to(real)
    message = "it is a symbolic link"
  else:
    path.mkdir()
    (path / "manifest.json").write_text('{"name": "my web app"}')
    message = r"the folder is not a saved memory \(it holds manifest.json\)"
  before = _tree_digest(tmp_path)
  with pytest.raises(ValueError, match=f"^cannot save a memory to {path}: {message}"):
    _memory(1).save(path)
  assert _tree_digest(tmp_path) == before


def test_saving_onto_an_empty_folder_a_missing_path_or_an_older_memory(tmp_path):
  (tmp_path / "empty").mkdir()
  for name in ("empty", "missing/deeper/mem"):
    _memory(0).save(tmp_path / name)
    assert _same(load_memory(tmp_path / name), _memory(0))
  # An older format of this library is a memory too: replaced, not refused.
  manifest_path = tmp_path / "empty" / "manifest.json"
  manifest_path.write_text(json.dumps(dict(json.loads(manifest_path.read_text()),
                                           format_version=2)))
  with pytest.raises(ValueError, match="format_version 2, this code reads 3; rebuild the memory"):
    load_memory(tmp_path / "empty")
  _memory(1).save(tmp_path / "empty")
  assert _same(load_memory(tmp_path / "empty"), _memory(1))
  assert sorted(os.listdir(tmp_path)) == ["empty", "missing"]


def test_concurrent_saves_and_loads_of_one_path(tmp_path):
  # Threads lock like processes here: each save opens the lock file itself. Without the lock a
  # save would delete the other's copy in progress as debris.
  path = tmp_path / "mem"
  memories = [_memory(seed, n=20_000, d=32) for seed in range(2)]
  memories[0].save(path)
  start = threading.Barrier(3)
  errors, loads = [], []

  def save_repeatedly(memory):
    try:
      start.wait()
      for _ in range(6):
        memory.save(path)
    except Exception as err:  # pylint: disable=broad-except
      errors.append(err)

  def load_repeatedly():
    start.wait()
    while True:  # at least one load, however the threads are scheduled
      saving = any(thread.is_alive() for thread in savers)
      try:
        loaded = load_memory(path)
        loads.append(any(_same(loaded, m) for m in memories))
      except Exception as err:  # pylint: disable=broad-except
        errors.append(err)
      if not saving:
        break

  savers = [threading.Thread(target=save_repeatedly, args=(m,)) for m in memories]
  loader = threading.Thread(target=load_repeatedly)
  for thread in savers + [loader]:
    thread.start()
  for thread in savers + [loader]:
    thread.join(timeout=120)
  assert not errors, errors
  assert loads and all(loads), loads
  loaded = load_memory(path)
  assert any(_same(loaded, m) for m in memories)
  assert sorted(os.listdir(tmp_path)) == ["mem"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_and_folders_follow_the_umask(tmp_path, umask):
  previous = os.umask(umask)
  try:
    _memory(0, n=300, backend="scann", mode="tree_ah", num_leaves=4).save(tmp_path / "a" / "mem")
  finally:
    os.umask(previous)
  modes = {}
  for folder, dirs, names in os.walk(tmp_path / "a"):
    for name in dirs + names:
      full = os.path.join(folder, name)
      modes[os.path.relpath(full, tmp_path)] = stat.S_IMODE(os.stat(full).st_mode)
  assert "a/mem/index/scann_config.pb" in modes and "a/mem/manifest.json" in modes
  for rel, mode in modes.items():
    want = 0o777 & ~umask if os.path.isdir(tmp_path / rel) else 0o666 & ~umask
    assert mode == want, (rel, oct(mode), oct(want))


@pytest.mark.parametrize("kind", ["the memory's file names", "a memory and a user's file"])
def test_a_folder_is_replaced_only_when_its_manifest_proves_a_memory(tmp_path, kind):
  path = tmp_path / "target"
  if kind == "the memory's file names":
    path.mkdir()
    (path / "manifest.json").write_text('{"name": "my web app", "files": {}}')
    (path / "keys.npy").write_bytes(b"my keys")
    (path / "index").mkdir()
    (path / "index" / "notes.txt").write_text("mine")
  else:
    _memory(0).save(path)
    (path / "index" / "notes.txt").write_text("mine")  # not listed in the manifest
  before = _tree_digest(tmp_path)
  with pytest.raises(ValueError, match=f"^cannot save a memory to {path}: the folder is not a "
                                       "saved memory.*no manifest of this library lists its files"):
    _memory(1).save(path)
  assert _tree_digest(tmp_path) == before
