"""ScaNN's saved index as a memory keeps it: the 4-bit AH codes packed two to a byte.

ScaNN's serializer writes each 4-bit AH code in a byte of its own (``hashed_dataset.npy``,
uint8 ``[n, blocks]``: 129 B per row at d = 128 with the mips_l2 extra coordinate and one
dimension per block). :func:`write` packs them two to a byte (``hashed_dataset_4bit.npy``, half
the disk) and removes ScaNN's file. ScaNN reads only its own layout, so :func:`read` unpacks the
codes into a temporary folder (``tempfile``'s, so ``TMPDIR`` chooses it: 1 B per code of room
while it loads), beside links to the other files, loads the searcher from there and removes the
folder. A folder ScaNN wrote itself (codes one to a byte) is read as it is.

Why a memory reloads after saving: a searcher built by ScaNN's upsert (the streamed build in
:mod:`resmem_jax.memory.scann`) holds 30-50 B per row more than the same index read back from
its files (BUILD_NOTES.md, issue 21); the answers are the same, code for code.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

CODES = "hashed_dataset.npy"  # ScaNN's name for its AH codes, one to a byte
PACKED_CODES = "hashed_dataset_4bit.npy"  # the same codes, two to a byte (low nibble first)
ROWS_PER_STEP = 1 << 18  # rows packed or unpacked per step: bounds the temporaries (34 MB)


def _read_header(f) -> tuple[tuple[int, ...], np.dtype]:
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
  else:
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  if fortran:
    raise ValueError("a Fortran-ordered array")
  return shape, dtype


def _copy_rows(source: str, target: str, shape_out, convert) -> int:
  """Streams the uint8 ``[n, c]`` array in ``source`` through ``convert`` (a block of rows to a
  block of rows) into a new ``target`` ``.npy`` of ``shape_out``, a block at a time. Returns the
  largest value read."""
  with open(source, "rb") as src, open(target, "wb") as dst:
    shape, dtype = _read_header(src)
    if dtype != np.uint8 or len(shape) != 2:
      raise ValueError(f"{source} holds {dtype} {shape}, not uint8 codes [n, c]")
    n, columns = shape
    largest = 0
    np.lib.format.write_array_header_1_0(
        dst, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": tuple(shape_out)})
    for start in range(0, n, ROWS_PER_STEP):
      rows = min(ROWS_PER_STEP, n - start)
      block = np.fromfile(src, np.uint8, rows * columns)
      if block.size != rows * columns:
        raise ValueError(f"{source} ends after {start * columns + block.size} of its "
                         f"{n * columns} codes")
      largest = max(largest, int(block.max(initial=0)))
      dst.write(np.ascontiguousarray(convert(block.reshape(rows, columns))).tobytes())
  return largest


def _pack(block: np.ndarray) -> np.ndarray:
  """4-bit codes ``[r, c]`` two to a byte ``[r, ceil(c / 2)]``, the first in the low nibble."""
  if block.shape[1] % 2:
    block = np.pad(block, ((0, 0), (0, 1)))
  return block[:, 0::2] | (block[:, 1::2] << 4)


def _unpack(block: np.ndarray, columns: int) -> np.ndarray:
  """The inverse of :func:`_pack`: ``[r, columns]`` codes."""
  return np.stack([block & 15, block >> 4], axis=2).reshape(len(block), -1)[:, :columns]


def write(searcher, directory: str) -> int | None:
  """ScaNN's files for ``searcher`` in ``directory``, its AH codes packed. Returns the codes'
  column count, which :func:`read` needs, or None when nothing was packed (no AH codes: brute
  force; or codes of more than 4 bits, kept as ScaNN wrote them)."""
  searcher.serialize(directory, relative_path=True)
  codes = os.path.join(directory, CODES)
  if not os.path.isfile(codes):
    return None
  with open(codes, "rb") as f:
    shape, dtype = _read_header(f)
  if dtype != np.uint8 or len(shape) != 2:
    return None
  n, columns = shape
  packed = os.path.join(directory, PACKED_CODES)
  if _copy_rows(codes, packed, (n, (columns + 1) // 2), _pack) > 15:
    # Not lut16's 4-bit codes: ScaNN's own file stays.
    os.unlink(packed)
    return None
  os.unlink(codes)
  return int(columns)


def read(scann, directory: str, columns: int | None):
  """The searcher saved in ``directory`` by :func:`write` (``columns``: what it returned), with
  ``scann`` the ``scann_ops_pybind`` module."""
  if columns is None:
    return scann.load_searcher(directory)
  packed = os.path.join(directory, PACKED_CODES)
  if not os.path.isfile(packed):
    raise ValueError(f"{packed} is missing (the index info says its codes are packed)")
  with open(packed, "rb") as f:
    shape, dtype = _read_header(f)
  if dtype != np.uint8 or len(shape) != 2 or shape[1] != (columns + 1) // 2:
    raise ValueError(f"{packed} holds {dtype} {shape}, expected uint8 [n, {(columns + 1) // 2}] "
                     f"(codes of {columns} blocks, two to a byte)")
  n = shape[0]
  scratch = tempfile.mkdtemp(prefix="resmem_scann_")
  try:
    for name in os.listdir(directory):
      if name != PACKED_CODES:
        source = os.path.abspath(os.path.join(directory, name))
        try:
          os.symlink(source, os.path.join(scratch, name))
        except OSError:  # a file system without links: a copy (the other files are small)
          shutil.copyfile(source, os.path.join(scratch, name))
    try:
      _copy_rows(packed, os.path.join(scratch, CODES), (n, columns),
                 lambda block: _unpack(block, columns))
    except OSError as err:
      raise OSError(err.errno, f"cannot unpack the ScaNN index's codes ({n * columns} bytes) "
                    f"into {scratch} ({err.strerror}); set TMPDIR to a folder with room") from None
    return scann.load_searcher(scratch)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
