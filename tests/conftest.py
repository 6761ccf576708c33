"""Shared pytest fixtures and helpers.

Tests run on CPU with no network. The multi-device tests run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before jax is imported
and slows single-device code, so it is not set for the whole session).
"""
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Real TFDS archives (one folder per data set: mnist/, tiny_shakespeare/ with the files TFDS
# downloads); point RESMEM_DATASETS at your own copy. Tests that need them skip without them.
SHARED_DATASETS = pathlib.Path(os.environ.get("RESMEM_DATASETS",
                                              REPO_ROOT.parent / "shared" / "datasets"))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def shared_dataset_dir(name: str) -> pathlib.Path:
  """The real archives for TFDS `name` under RESMEM_DATASETS (default ../shared/datasets), or skip
  the test."""
  path = SHARED_DATASETS / name
  if not path.is_dir():
    pytest.skip(f"{path} not present (set RESMEM_DATASETS to a folder holding {name}/)")
  return path


def run_python(code: str, devices: int = 1, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter (optionally with N fake CPU devices); raises on failure."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
  if devices > 1:
    full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=timeout, env=full_env, cwd=str(REPO_ROOT))
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
  return proc


def digits_settings(**resmem):
  """The tiny digits job with a small selection grid and the exact backend; ``resmem`` fields
  override (the engine tests' and the compact-memory tests' run)."""
  from resmem_jax import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from resmem_jax.configs import digits  # pylint: disable=g-import-not-at-top
  cfg = digits.get_config("tiny")
  cfg.resmem.backend = resmem.pop("backend", "exact")
  cfg.resmem.k_grid = (1, 4, 16)
  cfg.resmem.sigma_grid = (0.1, 1.0, 10.0)
  cfg.resmem.temperature_grid = (1.0, 2.0)
  cfg.resmem.timing_repeats = 1
  for key, value in resmem.items():
    cfg.resmem[key] = value
  return settings_lib.from_config(cfg)
