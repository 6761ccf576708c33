"""Saving and loading a memory: the folder layout, its self-checking manifest, checksums.

A saved memory is a folder::

    manifest.json         format_version, n, d, num_outputs, key_dtype (the key format),
                          residual_format,
                          residual_dtypes, top_m, labels, backend, backend_options, index (the
                          backend's info, e.g. the ScaNN centre), metadata, files (byte count and
                          sha256 of every other file) and manifest_sha256: the sha256 of the
                          manifest's canonical JSON (sorted keys, separators "," and ":", ASCII)
                          without that field
    keys.npy              float32 [n, d]; bfloat16: its uint16 bit pattern; float16 and int8:
                          the codes in that dtype
    key_scales.npy        float16 and int8 keys: float32 [n]
    key_centroid_ids.npy  bfloat16, float16 and int8 keys: uint16 [n]
    key_centroids.npy     bfloat16, float16 and int8 keys: float32 [<= 1024, d]
    labels.npy            int32 [n] (only when the memory has labels)
    residuals.npy         dense: float32 [n, C]; bfloat16: its uint16 bit pattern
    sparse_columns.npy    sparse, sparse_float16: class ids [n, m + 1]
    sparse_values.npy     sparse: float32 [n, m + 1]; sparse_float16: float16
    index/                the backend's own files (:meth:`SearchIndex.save`; may be empty)

Saving writes a complete copy beside ``path`` and swaps it in
(:func:`resmem_jax.memory.atomic_dir.replace_folder`), so a kill at any instant leaves the old or
the new memory. It replaces only a folder that holds a saved memory, proven by its manifest (parsed,
its checksum verified, and every entry of the folder listed in it), never by file names: anything
else but a missing path or an empty folder (a file, a symbolic link, a folder of other files, a
folder whose ``manifest.json`` is not this library's) is refused, touching nothing. Loading trusts
nothing: the manifest must match its own checksum and hold exactly the fields above with the right
types, ``files`` must name exactly the files on disk, every one a regular file (a FIFO or a device
is refused before it is opened, so a load never blocks), and every file must have its recorded size
and sha256 (checked in the pass that reads it) and the shape and dtype the manifest states. Each
problem is one ValueError naming the file and saying to rebuild the memory.

What the checksums guard: accidental damage (a flipped bit, a truncated or partly written file, a
file from another save, a hand edit that forgot the checksum). They are unkeyed sha256 sums, so
they do not guard against deliberate edits: whoever can write the folder can recompute them. Load
memories only from folders you trust.

A save that runs out of space says so: an ``OSError`` with errno ENOSPC, "disk full", naming the
path, also when ScaNN's serializer reports only a generic I/O error (the free space is checked).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat

import numpy as np

from resmem_jax import jsonio
from resmem_jax.memory import atomic_dir
from resmem_jax.memory import index as index_lib
from resmem_jax.memory import store as store_lib
from resmem_jax.memory.keys import KEY_FORMATS
from resmem_jax.memory.keys import KeyStore

MANIFEST = "manifest.json"
# 3: manifest_sha256 and an exact field set; ScaNN indexes hold power-of-two scaled keys.
MANIFEST_VERSION = 3
INDEX_DIR = "index"
KEYS_FILE = "keys.npy"
DATA_FILES = (KEYS_FILE, "key_scales.npy", "key_centroid_ids.npy", "key_centroids.npy",
              "labels.npy", "residuals.npy", "sparse_columns.npy", "sparse_values.npy")
REBUILD = "rebuild the memory (build it and save it again)"

# field -> allowed JSON types (int excludes bool)
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "n": int, "d": int, "num_outputs": int, "key_dtype": str,
    "residual_format": str, "residual_dtypes": dict, "top_m": (int, type(None)), "labels": bool,
    "backend": str, "backend_options": dict, "index": dict, "metadata": dict, "files": dict,
    "manifest_sha256": str,
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def save(path, keys: KeyStore, labels: np.ndarray | None, store, backend: str, index,
         metadata: dict) -> None:
  """Writes a memory's parts to folder ``path`` (see the module docstring)."""
  atomic_dir.replace_folder(
      path, lambda folder: write(folder, keys, labels, store, backend, index, metadata),
      _check_replaceable, _is_complete)


def write(folder, keys: KeyStore, labels: np.ndarray | None, store, backend: str, index,
          metadata: dict) -> str:
  """Writes a memory's parts into the empty folder ``folder``, the manifest last, without any
  swap: for a caller that commits the folder itself (a memory inside a larger unit). Returns the
  manifest's ``manifest_sha256``, the digest that names this memory's whole content."""
  folder = os.fspath(folder)
  try:
    arrays = {**keys.arrays(), **store.arrays()}
    if labels is not None:
      arrays["labels"] = labels
    files = {f"{name}.npy": _write_array(os.path.join(folder, f"{name}.npy"), array)
             for name, array in arrays.items()}
    os.mkdir(os.path.join(folder, INDEX_DIR))
    try:
      index_info = index.save(os.path.join(folder, INDEX_DIR))
    except Exception as err:  # pylint: disable=broad-except  # native serializers raise anything
      _raise_if_disk_full(folder, err)
      raise
    for rel in _files_under(folder, INDEX_DIR):
      files[rel] = _digest_file(os.path.join(folder, rel))
    manifest = {
        "format_version": MANIFEST_VERSION,
        "n": len(keys), "d": keys.dim, "num_outputs": int(store.num_outputs),
        "key_dtype": keys.format,
        "residual_format": store.format,
        "residual_dtypes": {name: str(a.dtype) for name, a in store.arrays().items()},
        "top_m": getattr(store, "top_m", None),
        "labels": labels is not None,
        "backend": backend,
        "backend_options": index.options,
        "index": index_info,
        "metadata": metadata,
        "files": files,
    }
    # The checksum covers the manifest as it reads back (JSON turns tuples into lists, int keys
    # into strings).
    manifest = json.loads(json.dumps(manifest))
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    with open(os.path.join(folder, MANIFEST), "w") as f:  # last: it marks the copy complete
      json.dump(manifest, f, indent=1, sort_keys=True)
  except OSError as err:
    _raise_if_disk_full(folder, err)
    raise
  return manifest["manifest_sha256"]


# Free bytes below which a failed write is taken for a full disk.
DISK_FULL_BYTES = 1 << 20


def _raise_if_disk_full(folder: str, err: BaseException) -> None:
  """Re-raises ``err`` as ENOSPC "disk full" when it is one, or when the file system holding
  ``folder`` has (almost) no space left: ScaNN reports a full disk as a bare I/O error."""
  full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
  if not full:
    try:
      info = os.statvfs(folder)
      full = info.f_bavail * info.f_frsize < DISK_FULL_BYTES
    except OSError:
      full = False
  if full:
    # Name the folder being saved, not the temporary copies it is written through.
    target = re.sub(r"\.([^/]+)\.(tmp|old|del)-[0-9a-f]+-[0-9]+-[0-9a-f]+", r"\1",
                    os.path.abspath(folder))
    raise OSError(errno.ENOSPC, f"disk full: no space left to save the memory in "
                  f"{target} "
                  f"({type(err).__name__}: "
                  f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else 'no detail'});"
                  " free some space and run again") from None


def load(path):
  """``(keys, labels | None, store, backend, index, metadata)`` of the memory saved at ``path``.

  FileNotFoundError when ``path`` holds no memory, ValueError when it is damaged (see the module
  docstring). A save killed between its two renames is completed first.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(os.path.join(path, MANIFEST)) and atomic_dir.interrupted(path):
    try:
      atomic_dir.restore(path, _is_complete)
    except OSError as err:
      raise FileNotFoundError(f"no memory at {path}: a save to it was interrupted and the copy "
                              f"beside it cannot be put back ({err})") from None
  with atomic_dir.reading(path):
    return _read(path)[0]


def read(path):
  """``((keys, labels, store, backend, index, metadata), manifest_sha256)`` of the memory in folder
  ``path``, checked as :func:`load` checks it, without its lock or repair: for a caller that holds
  the lock of a larger unit the memory is part of (and checks the digest against its own record)."""
  return _read(os.path.abspath(os.fspath(path)))


def manifest_digest(path) -> str:
  """The ``manifest_sha256`` of the memory in folder ``path`` (its manifest verified; ValueError or
  OSError when there is none)."""
  return _read_manifest(os.fspath(path))["manifest_sha256"]


def is_saved_memory(path) -> bool:
  """Whether folder ``path`` holds a memory this library saved: its manifest parsed and verified
  (a current one by its checksum, an older format by its fields), every entry in the folder listed
  in it, no symbolic link, nothing but regular files and folders. File names alone never count."""
  path = os.fspath(path)
  try:
    manifest = _read_manifest(path)
  except _OlderFormat as older:
    manifest = older.manifest
  except (ValueError, OSError):
    return False
  files = manifest.get("files")
  if not isinstance(files, dict):
    return False
  for current, dirs, names in os.walk(path):
    for name in dirs + names:
      full = os.path.join(current, name)
      rel = os.path.relpath(full, path).replace(os.sep, "/")
      info = os.lstat(full)
      if stat.S_ISDIR(info.st_mode):
        if rel != INDEX_DIR and not any(listed.startswith(rel + "/") for listed in files):
          return False
      elif not stat.S_ISREG(info.st_mode) or (rel != MANIFEST and rel not in files):
        return False
  return True


class _HashingWriter:
  """A file wrapper that hashes and counts what is written through it (one pass over the data)."""

  def __init__(self, f):
    self._f = f
    self.digest = hashlib.sha256()
    self.size = 0

  def write(self, data) -> int:
    view = memoryview(data).cast("B")
    self.digest.update(view)
    self.size += view.nbytes
    return self._f.write(view)


class _HashingReader:
  """A file wrapper that hashes what is read through it, so a file is read and checked at once."""

  def __init__(self, f):
    self._f = f
    self.digest = hashlib.sha256()

  def read(self, size: int = -1) -> bytes:
    data = self._f.read(size)
    self.digest.update(data)
    return data


def _write_array(path: str, array: np.ndarray) -> dict:
  with open(path, "wb") as f:
    writer = _HashingWriter(f)
    np.lib.format.write_array(writer, np.asarray(array), allow_pickle=False)
  return {"bytes": writer.size, "sha256": writer.digest.hexdigest()}


def _digest_file(path: str) -> dict:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
    size = f.tell()
  return {"bytes": size, "sha256": digest.hexdigest()}


def _files_under(root: str, folder: str) -> list[str]:
  """Paths of the files under ``root/folder``, relative to ``root`` ("/"-separated)."""
  found = []
  for current, _, names in os.walk(os.path.join(root, folder)):
    found += [os.path.relpath(os.path.join(current, name), root) for name in names]
  return sorted(rel.replace(os.sep, "/") for rel in found)


def _manifest_digest(manifest: dict) -> str:
  body = {name: value for name, value in manifest.items() if name != "manifest_sha256"}
  canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _check_replaceable(path: str) -> None:
  """ValueError unless ``path`` is missing, an empty folder or a saved memory (see
  :func:`is_saved_memory`: proven by its verified manifest, never by file names)."""
  if not os.path.lexists(path):
    return
  if os.path.islink(path):
    raise ValueError(f"cannot save a memory to {path}: it is a symbolic link; save to the folder "
                     "it points to, or remove the link")
  if not os.path.isdir(path):
    raise ValueError(f"cannot save a memory to {path}: it is a file, not a memory folder; choose "
                     "another path, or delete the file")
  names = sorted(os.listdir(path))
  if not names or is_saved_memory(path):
    return
  foreign = [name for name in names if name not in DATA_FILES + (MANIFEST, INDEX_DIR)]
  shown = ", ".join(foreign[:3] or names[:3]) + (", ..." if len(foreign or names) > 3 else "")
  raise ValueError(f"cannot save a memory to {path}: the folder is not a saved memory (it holds "
                   f"{shown}); no manifest of this library lists its files; save to a new or "
                   "empty folder")


def is_complete(folder) -> bool:
  """Whether ``folder`` holds a whole memory: its manifest valid and every file of its size (what
  a killed save's copy must be to be put back)."""
  return _is_complete(os.fspath(folder))


def _is_complete(folder: str) -> bool:
  """Whether a copy left by a killed save is whole (manifest valid, every file of its size)."""
  try:
    files = _read_manifest(folder)["files"]
    return all(os.path.getsize(os.path.join(folder, rel)) == entry["bytes"]
               for rel, entry in files.items())
  except (ValueError, OSError):
    return False


# -- reading ------------------------------------------------------------------------------------
class _OlderFormat(ValueError):
  """A manifest of an older format of this library (a memory, though this code cannot read it)."""

  def __init__(self, message: str, manifest: dict):
    super().__init__(message)
    self.manifest = manifest


def _open_regular(path: str):
  """``path`` opened for reading, refused (ValueError) unless it is a regular file: opening a FIFO
  would block, a device could read forever. O_NONBLOCK keeps the open itself from blocking."""
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
              else "a socket" if stat.S_ISSOCK(mode) else "a device or special file")
      raise ValueError(f"{path} is {kind}, not a regular file; {REBUILD}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


def _read_manifest(folder: str) -> dict:
  """The manifest of ``folder``, checked against its checksum and the field list."""
  manifest_path = os.path.join(folder, MANIFEST)

  def bad(problem):
    return ValueError(f"{manifest_path} {problem}; {REBUILD}")

  with _open_regular(manifest_path) as f:
    text = f.read()
  try:
    manifest = jsonio.loads(text)
  except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
    raise bad(f"is not valid JSON ({err})") from None
  if not isinstance(manifest, dict):
    raise bad(f"is not a JSON object but a {type(manifest).__name__}")
  version = manifest.get("format_version")
  if version != MANIFEST_VERSION:
    problem = bad(f"has format_version {version!r}, this code reads {MANIFEST_VERSION}")
    if (isinstance(version, int) and not isinstance(version, bool)
        and 1 <= version < MANIFEST_VERSION):
      raise _OlderFormat(str(problem), manifest)
    raise problem
  if manifest.get("manifest_sha256") != _manifest_digest(manifest):
    raise bad("does not match its own checksum (manifest_sha256): it was edited or damaged")
  missing = sorted(set(_FIELDS) - set(manifest))
  unknown = sorted(set(manifest) - set(_FIELDS))
  if missing or unknown:
    raise bad(f"lacks the fields {missing}" if missing else f"has unknown fields {unknown}")
  for name, types in _FIELDS.items():
    value = manifest[name]
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
      raise bad(f"field {name} has the wrong type ({value!r})")
  for name in ("n", "d", "num_outputs"):
    if manifest[name] < 1:
      raise bad(f"field {name} must be at least 1, got {manifest[name]}")
  if manifest["key_dtype"] not in KEY_FORMATS:
    raise bad(f"field key_dtype must be one of {list(KEY_FORMATS)}, got "
              f"{manifest['key_dtype']!r}")
  backend, residual_format = manifest["backend"], manifest["residual_format"]
  if backend not in index_lib.BACKENDS or residual_format not in store_lib.FORMATS:
    raise bad(f"names backend {backend!r} / residual_format {residual_format!r}, expected one "
              f"of {tuple(index_lib.BACKENDS)} / {store_lib.FORMATS}")
  sparse = residual_format in store_lib.SPARSE_FORMATS
  top_m = manifest["top_m"]
  if sparse != (top_m is not None) or (sparse and top_m < 1):
    raise bad(f"field top_m is {top_m!r}; the {residual_format} format needs "
              + ("a positive integer" if sparse else "null"))
  names = _residual_names(residual_format)
  dtypes = manifest["residual_dtypes"]
  if sorted(dtypes) != sorted(names) or not all(isinstance(v, str) for v in dtypes.values()):
    raise bad(f"field residual_dtypes is {dtypes!r}, expected a dtype name for each of {names}")
  files = manifest["files"]
  if not files:
    raise bad("lists no files (files is empty)")
  for rel, entry in files.items():
    if (not isinstance(entry, dict) or sorted(entry) != ["bytes", "sha256"]
        or not isinstance(entry["bytes"], int) or isinstance(entry["bytes"], bool)
        or entry["bytes"] < 0 or not isinstance(entry["sha256"], str)
        or not _SHA256.fullmatch(entry["sha256"])):
      raise bad(f"files entry {rel!r} must be {{'bytes': int >= 0, 'sha256': 64 hex digits}}, "
                f"got {entry!r}")
    parts = rel.split("/")
    if rel == MANIFEST or "\\" in rel or any(p in ("", ".", "..") for p in parts):
      raise bad(f"files names {rel!r}, not a file inside the memory folder")
  data = {rel for rel in files if not rel.startswith(INDEX_DIR + "/")}
  expected = {*(f"{name}.npy" for name in KeyStore.array_names(manifest["key_dtype"])),
              *(f"{name}.npy" for name in names)}
  if manifest["labels"]:
    expected.add("labels.npy")
  if data != expected:
    raise bad(f"files lists the data files {sorted(data)}, expected {sorted(expected)}")
  return manifest


def _residual_names(residual_format: str) -> list[str]:
  return store_lib.array_names(residual_format)


def _check_files_on_disk(folder: str, files: dict) -> None:
  """The files in ``folder`` (but the manifest) are exactly those ``files`` lists."""
  on_disk: set[str] = set()
  for current, dirs, names in os.walk(folder):
    for name in dirs + names:
      full = os.path.join(current, name)
      mode = os.lstat(full).st_mode
      if stat.S_ISLNK(mode):
        raise ValueError(f"memory folder {folder} holds a symbolic link {full}; {REBUILD}")
      if name in names and not stat.S_ISREG(mode):
        raise ValueError(f"memory file {full} is not a regular file (a FIFO, socket or device); "
                         f"{REBUILD}")
    on_disk.update(os.path.relpath(os.path.join(current, name), folder).replace(os.sep, "/")
                   for name in names)
  on_disk.discard(MANIFEST)
  missing, extra = sorted(set(files) - on_disk), sorted(on_disk - set(files))
  if missing:
    raise ValueError(f"memory file {os.path.join(folder, missing[0])} listed in the manifest is "
                     f"missing; {REBUILD}")
  if extra:
    raise ValueError(f"{os.path.join(folder, extra[0])} is not listed in the manifest of the "
                     f"memory in {folder} (an extra file); {REBUILD}")


def _open_checked(folder: str, rel: str, entry: dict):
  full = os.path.join(folder, rel)
  f = _open_regular(full)
  size = os.fstat(f.fileno()).st_size
  if size != entry["bytes"]:
    f.close()
    raise ValueError(f"memory file {full} has {size} bytes, the manifest says {entry['bytes']} "
                     f"(truncated or replaced); {REBUILD}")
  return f


def _checksum_failure(folder: str, rel: str) -> ValueError:
  return ValueError(f"memory file {os.path.join(folder, rel)} fails its sha256 checksum "
                    f"(corrupt); {REBUILD}")


def _verify_file(folder: str, rel: str, entry: dict) -> None:
  with _open_checked(folder, rel, entry) as f:
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  if digest.hexdigest() != entry["sha256"]:
    raise _checksum_failure(folder, rel)


def _read_array(folder: str, rel: str, entry: dict) -> np.ndarray:
  """The array in ``rel``, its size and sha256 checked in the same read."""
  with _open_checked(folder, rel, entry) as f:
    reader = _HashingReader(f)
    try:
      array, problem = np.lib.format.read_array(reader, allow_pickle=False), None
    except (ValueError, OSError, EOFError) as err:
      array, problem = None, err
    while reader.read(1 << 20):  # the rest (if any) counts towards the checksum too
      pass
  if reader.digest.hexdigest() != entry["sha256"]:
    raise _checksum_failure(folder, rel)
  if array is None:  # read_array raised `problem`
    raise ValueError(f"cannot read {os.path.join(folder, rel)}: {problem}; {REBUILD}")
  return array


def _read(path: str):
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no memory folder at {path}")
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path):
    raise FileNotFoundError(f"{manifest_path} is missing; {path} is not a saved memory")
  manifest = _read_manifest(path)
  files = manifest["files"]
  _check_files_on_disk(path, files)
  n, d, num_outputs = manifest["n"], manifest["d"], manifest["num_outputs"]
  backend, residual_format = manifest["backend"], manifest["residual_format"]

  def read(name):
    return _read_array(path, f"{name}.npy", files[f"{name}.npy"])

  def disagree(name, array, shape, dtype):
    return ValueError(f"{os.path.join(path, name + '.npy')} has shape {array.shape} dtype "
                      f"{array.dtype}, the manifest says {shape or 'any shape'} {dtype}; {REBUILD}")

  key_format = manifest["key_dtype"]
  try:
    keys = KeyStore.from_arrays({name: read(name) for name in KeyStore.array_names(key_format)},
                                key_format, n, d)
  except ValueError as err:
    raise ValueError(f"the key files in {path} disagree with {manifest_path}: {err}; "
                     f"{REBUILD}") from None
  labels = None
  if manifest["labels"]:
    labels = read("labels")
    if labels.dtype != np.int32 or labels.shape != (n,):
      raise disagree("labels", labels, (n,), "int32")
  arrays = {}
  for name in _residual_names(residual_format):
    arrays[name] = read(name)
    if str(arrays[name].dtype) != manifest["residual_dtypes"][name]:
      raise disagree(name, arrays[name], None, manifest["residual_dtypes"][name])
  try:
    store = store_lib.store_from_arrays(arrays, residual_format, num_outputs, manifest["top_m"])
  except ValueError as err:
    raise ValueError(f"the residual files in {path} disagree with {manifest_path}: {err}; "
                     f"{REBUILD}") from None
  if len(store) != n:
    raise ValueError(f"the residual files in {path} hold {len(store)} rows, {manifest_path} says "
                     f"n={n}; {REBUILD}")
  for rel in files:
    if rel.startswith(INDEX_DIR + "/"):
      _verify_file(path, rel, files[rel])
  index_dir = os.path.join(path, INDEX_DIR)
  if not os.path.isdir(index_dir):
    raise ValueError(f"{index_dir} is missing; {REBUILD}")
  try:
    index = index_lib.index_class(backend).load(index_dir, keys, manifest["index"])
  except (KeyError, TypeError, ValueError) as err:
    raise ValueError(f"{manifest_path}: cannot load the {backend} index: {err}; "
                     f"{REBUILD}") from None
  return (keys, labels, store, backend, index, manifest["metadata"]), manifest["manifest_sha256"]
