"""The fault catalogue's in-process cases: every bad input to the public API and every damaged
saved memory gives a clear one-line error (or, for valid edge cases, a checked result)."""
import pytest

from experiments import faults


def _run(cases):
  return [(name, *case()) for name, case in cases]


def test_public_api_faults_are_all_clear():
  outcomes = _run(faults.api_cases())
  assert len(outcomes) >= 50
  bad = [o for o in outcomes if o[1] not in faults.GOOD]
  assert not bad, bad


def test_memory_save_and_load_faults_are_all_clear(tmp_path):
  outcomes = _run(faults.save_cases(tmp_path))
  bad = [o for o in outcomes if o[1] not in faults.GOOD]
  assert not bad, bad


@pytest.mark.parametrize("flags", [("--config.train.num_epoch=3",), ("--config.model.name=vgg",)])
def test_binary_faults_are_one_line(tmp_path, flags):
  workdir = tmp_path / "w"
  outcome, detail = faults.classify_binary(faults._binary([faults.DIGITS, *flags], workdir), workdir)
  assert outcome == "clear error", detail
