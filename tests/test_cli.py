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


@pytest.mark.slow
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


def _console_scripts():
  setup = configparser.ConfigParser()
  setup.read(REPO_ROOT / "setup.cfg")
  lines = setup["options.entry_points"]["console_scripts"].splitlines()
  return [tuple(l.strip().split(" = ")) for l in lines if l.strip()]


# Each tool's own flags, which --help must name beside the shared ones.
_OWN_FLAGS = {
    "resmem-jax": ("--start_over",),
    "resmem-jax-train": ("--start_over",),
    "resmem-jax-model-size-sweep": ("--field", "--values", "--seeds"),
    "resmem-jax-sample-size-sweep": ("--fractions", "--seeds"),
    "resmem-jax-theory": ("--dims", "--ns", "--seeds", "--noise_std"),
}


@pytest.mark.parametrize("script,entry", _console_scripts())
def test_help_says_what_each_tool_does_and_exits_0(script, entry):
  module = entry.split(":")[0]
  proc = _tool("--help", module=module, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert out.startswith(f"usage: {script} ") and not proc.stderr.strip(), out + proc.stderr
  for flag in ("--workdir=DIR", "--verbose", *_OWN_FLAGS[script]):
    assert f"  {flag}" in out, flag
  assert "Example:\n  " + script in out and "README.md" in out and "--helpfull" in out
  assert "--flagfile" not in out and "--jax_" not in out  # absl's and JAX's stay in --helpfull
  if script != "resmem-jax-theory":  # the one tool without a config
    assert "  --config=NAME[:VARIANT]" in out and "--print_config" in out
    for name in configs.NAMES:
      assert f"\n  {name} " in out, name
    assert "serving, resnet, mlp" in out  # the variants
  assert len(out.splitlines()) < 70


def test_help_of_the_checkout_module_is_the_same_tool():
  proc = _tool("-h", timeout=120)
  assert proc.returncode == 0 and proc.stdout.startswith("usage: resmem-jax --config=")


def test_print_config_without_config_names_the_configs():
  proc = _tool("--print_config", timeout=120)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("config error: --config is required"), lines
  for name in configs.NAMES:
    assert name in lines[0]
  assert "mnist[:serving|" in lines[0] and "--help" in lines[0]


def _reachable(host, port=443):
  import socket  # pylint: disable=g-import-not-at-top
  try:
    with socket.create_connection((host, port), timeout=3):
      return True
  except OSError:
    return False


@pytest.mark.slow
def test_missing_data_offline_is_one_line(tmp_path):
  if _reachable("storage.googleapis.com"):
    pytest.skip("the MNIST download host is reachable: the run would download, not fail")
  (tmp_path / "empty").mkdir()
  (tmp_path / "manual").mkdir()
  args = ("--config=mnist:tiny", f"--workdir={tmp_path / 'w'}",
          f"--config.data.data_dir={tmp_path / 'empty'}",
          f"--config.data.manual_dir={tmp_path / 'manual'}")
  proc = _tool(*args, timeout=120)
  lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert len(lines) <= 3, lines
  error = lines[-1]
  assert error.startswith("data error: TFDS data set 'mnist'"), error
  for archive in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                  "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    assert archive in error
  assert "--config.data.manual_dir=" in error
  verbose = _tool(*args, "--verbose", timeout=120)  # --verbose keeps the traceback
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr
  assert "DataUnavailable" in verbose.stderr


class _FailingBuilder:
  """A TFDS builder whose archives' host answers but whose download fails (a proxy, a 404)."""
  name = "mnist"
  MANUAL_DOWNLOAD_INSTRUCTIONS = None

  def __init__(self, root):
    self.data_dir_root = root
    self.url_infos = {"https://example.invalid/a/train.gz": type("I", (), {"filename": None})()}

  def is_prepared(self):
    return False

  def download_and_prepare(self, download_config):
    del download_config
    raise ConnectionError("HTTPSConnectionPool: Max retries exceeded\n  (more detail)")


def test_a_failed_download_is_one_line_unless_verbose(tmp_path, monkeypatch):
  from resmem_jax.cli import flags as cli_flags  # pylint: disable=g-import-not-at-top
  from resmem_jax.data import tfds_prepare  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tfds_prepare, "_host_reachable", lambda host, port: True)
  with pytest.raises(tfds_prepare.DataUnavailable) as err:
    tfds_prepare.prepare(_FailingBuilder(tmp_path), str(tmp_path))
  line = cli_flags.user_error_line(err.value)
  assert line is not None and "\n" not in line
  assert line.startswith("data error: preparing TFDS data set 'mnist' failed (HTTPSConnectionPool")
  assert "train.gz" in line and "--config.data.manual_dir=" in line
  assert isinstance(err.value, FileNotFoundError)  # as before: callers catching it still do
  with pytest.raises(SystemExit, match="^data error: "):
    with cli_flags.user_errors():
      raise err.value
  monkeypatch.setattr(cli_flags, "_verbose", lambda: True)
  with pytest.raises(tfds_prepare.DataUnavailable):  # --verbose: the error itself, traceback and all
    with cli_flags.user_errors():
      raise err.value
