"""The command-line tools as a user meets them: packaged configs by name, quiet output, one-line
errors, --print_config, missing optional dependencies named with their extra."""
import configparser
import importlib
import importlib.util
import pathlib
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from resmem_jax import configs, settings, validate


def _tool(*args, module="experiments.resmem", timeout=300):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        cwd=REPO_ROOT, env=env, timeout=timeout)


def test_main_job_by_config_name_is_quiet(tmp_path):
  proc = _tool("--config=digits:tiny", f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) <= 16, proc.stdout
  assert lines[0].startswith("data: digits") and lines[1].startswith("training: mlp")
  assert any(l.startswith("memory: ") for l in lines) and any(l.startswith("selection: ") for l in lines)
  assert lines[-1] == f"results: {tmp_path / 'run'}/results.json"
  assert (tmp_path / "run" / "results.json").exists()
  # No library chatter: no absl INFO lines, no TFDS or ScaNN native logs.
  assert not [l for l in proc.stderr.splitlines() if l.strip()], proc.stderr[-2000:]


def test_print_config_lists_every_field_with_its_meaning():
  proc = _tool("--config=mnist:serving", "--print_config")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "model.embed_dim = 32  # cnn: size of the dense embedding layer" in out
  assert "resmem.tune_recall = 0.97" in out
  fields = sum(len(cls.__dataclass_fields__) for cls in settings.SECTIONS.values())
  assert len([l for l in out.splitlines() if " = " in l]) == fields + 1  # + seed


@pytest.mark.parametrize("args,expected", [
    (("--config=digitz",), "config error: --config='digitz' is neither a packaged config (did you mean 'digits'?)"),
    (("--config=digits", "--config.train.num_epoch=3"),
     "config error: unknown config field train.num_epoch (did you mean 'num_epochs'?)"),
    (("--config=digits", "--workdr=/tmp/x"), "flag error: Unknown command line flag 'workdr'"),
    (("--config=mnist:nosuch",), "unknown mnist config variant 'nosuch'"),
])
def test_mistakes_end_in_one_line_within_seconds(tmp_path, args, expected):
  start = time.perf_counter()
  proc = _tool(*args, f"--workdir={tmp_path / 'w'}")
  assert time.perf_counter() - start < 60
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_a_missing_optional_dependency_names_its_extra(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a, **k: None if name == "scann" else real(name, *a, **k))
  s = settings.from_config(configs_module("digits").get_config("tiny"))
  with pytest.raises(settings.MissingDependency, match=r"pip install 'resmem_jax\[scann\]'"):
    validate.check(s)


def configs_module(name):
  return importlib.import_module(f"resmem_jax.configs.{name}")


def test_packaged_configs_resolve_by_name():
  assert configs.path("mnist").name == "mnist.py" and configs.path("mnist").exists()
  for name in configs.NAMES:
    assert configs.path(name).exists()
  with pytest.raises(ValueError, match="did you mean 'cifar10'"):
    configs.path("cifar1O")


def test_console_scripts_point_at_tools():
  setup = configparser.ConfigParser()
  setup.read(REPO_ROOT / "setup.cfg")
  scripts = [l.strip() for l in setup["options.entry_points"]["console_scripts"].splitlines()
             if l.strip()]
  assert any(s.startswith("resmem-jax = ") for s in scripts)
  for script in scripts:  # each tool defines its own flags: read, not import, all of them
    module, function = script.split(" = ")[1].split(":")
    source = pathlib.Path(importlib.util.find_spec(module).origin).read_text()
    assert f"\ndef {function}():" in source, script


@pytest.mark.parametrize("where,expected", [
    ("file", "file error: the path exists and is not a folder: {w}; choose another --workdir"),
    ("file/run", "file error: a part of the path is a file, not a folder: {w}; choose another "
                 "--workdir"),
])
def test_a_workdir_the_os_refuses_is_one_line(tmp_path, where, expected):
  (tmp_path / "file").write_text("a user's file")
  workdir = tmp_path / where
  proc = _tool("--config=digits:tiny", f"--workdir={workdir}")
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert len(lines) == 1 and lines[0].startswith(expected.format(w=workdir)), proc.stderr[-2000:]
  assert (tmp_path / "file").read_text() == "a user's file"
