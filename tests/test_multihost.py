"""Multi-host launches: every documented route, 2 local processes x 2 fake CPU devices equal to
1 process x 4 devices, and a killed process ends the others within a bounded time."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT
from resmem_jax import mesh, settings


def _train(**fields):
  return dataclasses.replace(settings.TrainSettings(), **fields)


def test_launch_routes():
  t = settings.TrainSettings()
  assert mesh.launch_arguments(t, env={}) is None  # one process
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert mesh.launch_arguments(t, env=env) == dict(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
      heartbeat_timeout_seconds=100)
  fields = _train(coordinator_address="h:1", num_processes=2, process_id=1,
                  heartbeat_timeout_seconds=7)
  assert mesh.launch_arguments(fields, env=env) == dict(
      coordinator_address="h:1", num_processes=2, process_id=1, heartbeat_timeout_seconds=7)
  assert mesh.launch_arguments(t, env={"SLURM_NTASKS": "8"}) == {"heartbeat_timeout_seconds": 100}
  assert mesh.launch_arguments(t, env={"TPU_WORKER_HOSTNAMES": "a,b"}) is not None
  assert mesh.launch_arguments(t, env={"JAX_COORDINATOR_ADDRESS": "h:1", "SLURM_NTASKS": "2"}) == {
      "coordinator_address": "h:1", "heartbeat_timeout_seconds": 100}
  assert mesh.launch_arguments(_train(distributed=False), env=env) is None
  with pytest.raises(settings.SettingsError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
    mesh.launch_arguments(t, env={"JAX_COORDINATOR_ADDRESS": "h:1"})
  with pytest.raises(settings.SettingsError, match="all set"):
    mesh.launch_arguments(_train(coordinator_address="h:1"), env={})
  with pytest.raises(settings.SettingsError, match="nothing describes the other processes"):
    mesh.launch_arguments(_train(distributed=True), env={})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
  return env


def _launch(module, workdir, processes, devices, *flags):
  """Starts ``processes`` processes of ``module`` (2 local devices each, JAX env vars)."""
  if processes == 1:
    return [subprocess.Popen([sys.executable, "-m", module, *flags, f"--workdir={workdir}"],
                             cwd=REPO_ROOT, env=_env(devices), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)]
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, "-m", module, *flags, f"--workdir={workdir}"], cwd=REPO_ROOT,
      env=_env(devices, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(processes)]


def _wait(procs, timeout=300):
  outputs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=timeout)
    outputs.append(out)
    assert proc.returncode == 0, out[-3000:]
  return outputs


FLAGS = ("--config=digits:tiny", "--config.resmem.backend=exact", "--config.resmem.timing_repeats=1")


@pytest.mark.slow
def test_two_processes_of_two_devices_equal_one_of_four(tmp_path):
  _wait(_launch("experiments.resmem", tmp_path / "one", 1, 4, *FLAGS))
  _wait(_launch("experiments.resmem", tmp_path / "two", 2, 2, *FLAGS))
  one = json.loads((tmp_path / "one" / "results.json").read_text())
  two = json.loads((tmp_path / "two" / "results.json").read_text())
  assert two["timing"]["devices"] == one["timing"]["devices"] == 4
  for head in ("base", "resmem"):
    for key, value in one[head].items():
      assert two[head][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (head, key)
  assert two["hparams"] == one["hparams"]
  assert two["comparison"]["gained"] == one["comparison"]["gained"]
  assert two["memory"]["size"] == one["memory"]["size"] == 1293
  lines = lambda w: [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
  for a, b in zip(lines(tmp_path / "one"), lines(tmp_path / "two")):
    assert a.keys() == b.keys() and all(np.isclose(a[k], b[k], rtol=1e-5) for k in a)

  # The memory split across the two hosts (each indexes the rows it embedded), on the same model:
  # the same figures as the one-host memory of the 1 x 4 run; a rerun reuses both parts.
  sharded_flags = FLAGS + ("--config.resmem.memory_across_hosts=True",)
  for attempt in range(2):
    _wait(_launch("experiments.resmem", tmp_path / "two", 2, 2, *sharded_flags))
    split = json.loads((tmp_path / "two" / "results.json").read_text())
    assert split["memory"]["reused"] == bool(attempt)
    for head in ("base", "resmem"):
      for key, value in one[head].items():
        assert split[head][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (head, key)
    assert split["memory"]["size"] == 1293
    assert split["comparison"] == one["comparison"]
  from resmem_jax import memory as memory_lib
  parts = [memory_lib.load_memory(tmp_path / "two" / "memory" / "index" / f"process_{i}")
           for i in range(2)]
  assert sum(part.size for part in parts) == 1293 and all(part.size < 1293 for part in parts)


@pytest.mark.slow
def test_a_killed_process_ends_the_other_and_a_rerun_resumes(tmp_path):
  flags = FLAGS + ("--config.train.num_epochs=10", "--config.train.checkpoint_every_steps=40",
                   "--config.train.heartbeat_timeout_seconds=10")
  procs = _launch("experiments.train", tmp_path / "run", 2, 2, *flags)
  deadline = time.time() + 240
  checkpoints = tmp_path / "run" / "checkpoints"
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      break
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  try:
    procs[0].communicate(timeout=120)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail("the surviving process did not end within 120 s of its peer's death")
  assert time.time() - killed_at < 60  # within the 10 s heartbeat timeout and a margin
  steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]
  assert steps and max(steps) < 400
  _wait(_launch("experiments.train", tmp_path / "run", 2, 2, *flags))
  _wait(_launch("experiments.train", tmp_path / "whole", 1, 4, *flags))
  final = lambda w: [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()][-1]
  resumed, whole = final(tmp_path / "run"), final(tmp_path / "whole")
  assert resumed["step"] == whole["step"] == 400
  for key in ("test_accuracy", "validation_accuracy"):
    assert resumed[key] == pytest.approx(whole[key], abs=1e-6)
