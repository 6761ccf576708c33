"""Training metrics: WORKDIR/metrics.jsonl (one JSON record per event) and TensorBoard.

Only process 0 writes. A resumed run first drops the records written after the checkpoint it
resumes from, so the file ends up exactly as an uninterrupted run's; the last record of a finished
run is marked ``"final": true`` and is what a rerun returns without training again.
"""
from __future__ import annotations

import json
import pathlib

import jax

from resmem_jax import jsonio

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Writes records to metrics.jsonl and TensorBoard on process 0 only."""

  def __init__(self, workdir: pathlib.Path, resume_step: int | None):
    """``resume_step``: the checkpoint step a resumed run starts from; None for a fresh run."""
    self.active = jax.process_index() == 0
    self.path = workdir / METRICS_FILE
    self.tb = None  # a tensorboardX SummaryWriter on process 0
    if not self.active:
      return
    if resume_step is not None and self.path.exists():
      kept = []
      for line in self.path.read_text().splitlines():
        try:
          record = jsonio.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut off by the kill
        if record.get("step", 0) <= resume_step and not record.get("final"):
          kept.append(line)
      self.path.write_text("".join(k + "\n" for k in kept))
    elif self.path.exists():
      self.path.unlink()
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(str(workdir / TENSORBOARD_DIR))

  def write(self, step: int, record: dict, final: bool = False) -> None:
    if not self.active or self.tb is None:  # tb is set whenever active
      return
    full = {"step": int(step), **{k: float(v) for k, v in record.items()}}
    if final:
      full["final"] = True
    with self.path.open("a") as f:
      f.write(json.dumps(full) + "\n")
    for key, value in record.items():
      self.tb.add_scalar(key, float(value), int(step))
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def final_record(workdir: pathlib.Path) -> dict | None:
  """The final metrics of a finished run from metrics.jsonl, or None."""
  path = workdir / METRICS_FILE
  if not path.exists():
    return None
  for line in reversed(path.read_text().splitlines()):
    try:
      record = jsonio.loads(line)
    except json.JSONDecodeError:
      continue
    if record.get("final"):
      record.pop("final")
      record["step"] = int(record["step"])
      record["num_params"] = int(record["num_params"])
      return record
  return None
