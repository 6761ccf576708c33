"""Every input checked where it enters (issue 24): complex arrays, JSON nested too deeply, and the
fault catalogue's input and settings cases, each a clear one-line error naming the problem."""
import json

import numpy as np
import pytest

import resmem_jax
from resmem_jax import jsonio
from experiments import faults


def test_complex_arrays_are_refused_not_cast_to_their_real_part():
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(20, 4)).astype(np.float32)
  memory = resmem_jax.build_memory(keys, np.zeros((20, 3), np.float32))
  base = np.full((2, 3), 1 / 3, np.float32)
  with pytest.raises(ValueError, match=r"base must be a real-valued numeric \[n, d\] array, .*"
                                       r"complex64"):
    resmem_jax.predict(memory, base + 1j, keys[:2], 2, 1.0)
  with pytest.raises(ValueError, match=r"queries must be a real-valued numeric .*complex"):
    resmem_jax.predict(memory, base, keys[:2] + 1j, 2, 1.0)
  with pytest.raises(ValueError, match=r"queries must be a real-valued numeric .*<U"):
    resmem_jax.predict(memory, base, keys[:2].astype(str), 2, 1.0)
  with pytest.raises(ValueError, match=r"targets must be real numbers, got complex dtype "
                                       r"complex128; pass the real part"):
    resmem_jax.regression_residuals(np.ones(3) + 1j, np.ones(3))
  with pytest.raises(ValueError, match=r"predictions must be real numbers"):
    resmem_jax.regression_residuals(np.ones(3), np.ones(3, np.complex64))
  with pytest.raises(ValueError, match=r"logits must be real numbers"):
    resmem_jax.residuals(np.zeros(2, int), np.zeros((2, 3), np.complex64))


def test_json_nested_too_deeply_reads_as_damaged_json(tmp_path):
  path = tmp_path / "resmem.json"
  path.write_text("[" * 100_000 + "]" * 100_000)
  # The same error as any other damaged JSON (callers catch ValueError / JSONDecodeError).
  with pytest.raises(json.JSONDecodeError, match="nested too deeply to read"):
    jsonio.read_json(path)
  with pytest.raises(ValueError, match="nested too deeply"):
    jsonio.loads(b"{\"a\": " * 100_000)
  path.write_text(json.dumps({"a": [[1, 2], {"b": None}]}))
  assert jsonio.read_json(path) == {"a": [[1, 2], {"b": None}]}


def test_the_input_fault_cases_are_all_clear():
  outcomes = [(name, *case()) for name, case in faults.input_cases()]
  assert len(outcomes) >= 30
  bad = [o for o in outcomes if o[1] not in faults.GOOD]
  assert not bad, bad


@pytest.mark.parametrize("flags", [("--config.resmem.k=5000",), ("--config.model.width=1e9",)])
def test_settings_refused_against_the_data_before_training(tmp_path, flags):
  workdir = tmp_path / "w"
  proc = faults._binary([faults.DIGITS, *flags], workdir)
  outcome, detail = faults.classify_binary(proc, workdir)
  assert outcome == "clear error", detail


def test_a_diverging_binary_run_ends_in_one_line(tmp_path):
  proc = faults._binary([faults.DIGITS, "--config.train.learning_rate=1e30"], tmp_path / "w")
  outcome, detail = faults.classify_binary(proc, prefix="training error: ")
  assert outcome == "clear error" and "training diverged" in detail and "step" in detail, detail
