"""Measures an accelerator in one run: training steps, memory search, the MNIST and tiny_shakespeare jobs.

  python -m experiments.bench_accelerator --out=/tmp/accelerator.json      # sized for 8 min on an H100
  python -m experiments.bench_accelerator --size=tiny --out=/tmp/acc.json  # about a minute on a CPU
  python -m experiments.bench_accelerator --sections=mnist,shakespeare --datasets_dir=../shared/datasets

Prints a table and writes a JSON: ResNet-50 and ResNet-20 train steps in bfloat16 and float32
with MFU against the device's peak (a vendor table of known devices, else the measured matmul),
``exact`` and ``approx`` search at 1M x 128 against their FLOP and memory-bandwidth bounds, the
MNIST main job's (mnist:small_mlp) wall time and accuracy, and the tiny_shakespeare job's memory
build and query rates (resmem_jax/bench/accelerator.py says what each figure is). Exits 1 when a
section or a training step failed (the others still run and are written).
"""
from resmem_jax.cli import flags as cli_flags  # first: quiets TensorFlow before it loads

import os

from absl import flags

from resmem_jax.bench import accelerator

_SIZE = flags.DEFINE_enum("size", "full", list(accelerator.SIZE_NAMES),
                          "full: sized for one H100 (8 min at most); tiny: a minute on a CPU "
                          "(small models, 4k keys, TFDS mock data for the jobs).")
_SECTIONS = flags.DEFINE_list("sections", list(accelerator.SECTIONS),
                              f"Sections to run, of {', '.join(accelerator.SECTIONS)}.")
flags.register_validator("sections", lambda names: set(names) <= set(accelerator.SECTIONS),
                         f"--sections takes names of {', '.join(accelerator.SECTIONS)}")
_OUT = flags.DEFINE_string("out", None, "Write the result here (JSON).")
_JOBS_DIR = flags.DEFINE_string("jobs_dir", None, "Folder for the jobs' workdirs (each run gets a "
                                "fresh one inside; default a temporary folder, removed after).")
_DATASETS = flags.DEFINE_string(
    "datasets_dir", os.environ.get("RESMEM_DATASETS"),
    "Folder holding the TFDS archives mnist/ and tiny_shakespeare/ (full size offline; default "
    "$RESMEM_DATASETS, else TFDS downloads).")
_TFDS_DIR = flags.DEFINE_string("tfds_dir", None, "TFDS data_dir for the prepared data sets "
                                "(default: TFDS's own).")
_SHAKESPEARE_BACKEND = flags.DEFINE_string(
    "shakespeare_backend", None, "Memory backend of the tiny_shakespeare job (default: the "
    "config's).")


def main(argv):
  del argv
  result = accelerator.run(_SECTIONS.value, size=_SIZE.value, out=_OUT.value,
                           workdir=_JOBS_DIR.value, datasets_dir=_DATASETS.value,
                           tfds_dir=_TFDS_DIR.value, shakespeare_backend=_SHAKESPEARE_BACKEND.value)
  if accelerator.failures(result):
    raise SystemExit(1)


if __name__ == "__main__":
  cli_flags.run(main)
