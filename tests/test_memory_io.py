"""Save/load round trips and detection of damaged memories: files, and a manifest that checks
itself."""
import hashlib
import json
import os

import numpy as np
import pytest

from resmem_jax.core.residuals import residuals as make_residuals
from resmem_jax.memory import build_memory, load_memory


def _memory(backend="exact", fmt="dense", n=400, **options):
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(n, 6)).astype(np.float32)
  labels = rng.integers(0, 5, n)
  res = make_residuals(labels, rng.normal(size=(n, 5)).astype(np.float32), 1.0)
  return build_memory(keys, res, backend=backend, residual_format=fmt, top_m=2, labels=labels,
                      metadata={"model": {"name": "resnet", "width": 16}, "step": 1200}, **options)


@pytest.mark.parametrize("backend", ["exact", "scann"])
@pytest.mark.parametrize("fmt", ["dense", "bfloat16", "sparse"])
def test_round_trip(tmp_path, backend, fmt):
  memory = _memory(backend, fmt)
  memory.add(np.full((2, 6), 5.0, np.float32), np.zeros((2, 5), np.float32), labels=[3, 4])
  queries = np.random.default_rng(1).normal(size=(20, 6)).astype(np.float32)
  path = tmp_path / "mem"
  memory.save(path)
  loaded = load_memory(path)
  assert (loaded.size, loaded.dim, loaded.num_outputs) == (402, 6, 5)
  assert (loaded.backend, loaded.residual_format) == (backend, fmt)
  assert loaded.backend_options == memory.backend_options
  assert loaded.metadata == {"model": {"name": "resnet", "width": 16}, "step": 1200}
  np.testing.assert_array_equal(loaded.labels, memory.labels)
  assert loaded.labels.dtype == np.int32 and loaded.labels[-2:].tolist() == [3, 4]
  for a, b in zip(memory.search(queries, 4), loaded.search(queries, 4)):
    np.testing.assert_array_equal(a, b)
  ids = memory.search(queries, 4)[1]
  for a, b in zip(memory.residual_rows(ids), loaded.residual_rows(ids)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(memory.gather_residuals(np.arange(402)),
                                loaded.gather_residuals(np.arange(402)))
  if backend == "scann":  # the side buffer (the 2 added keys) is rebuilt on load
    assert (loaded.index.indexed, loaded.index.size) == (400, 402)
  manifest = json.loads((path / "manifest.json").read_text())
  assert manifest["n"] == 402 and manifest["d"] == 6 and manifest["backend"] == backend
  assert manifest["labels"] is True and "labels.npy" in manifest["files"]
  # Saving over an existing memory replaces it and leaves no temp directories behind.
  loaded.add(np.zeros((1, 6), np.float32), np.zeros((1, 5), np.float32), labels=[0])
  loaded.save(path)
  assert load_memory(path).size == 403
  assert sorted(os.listdir(tmp_path)) == ["mem"]


def test_round_trip_without_labels(tmp_path):
  rng = np.random.default_rng(2)
  memory = build_memory(rng.normal(size=(30, 3)).astype(np.float32),
                        rng.normal(size=(30, 2)).astype(np.float32), block_size=7)
  memory.save(tmp_path / "mem")
  loaded = load_memory(tmp_path / "mem")
  assert loaded.labels is None and not (tmp_path / "mem" / "labels.npy").exists()
  assert loaded.backend_options == {"block_size": 7}  # only what was given is saved


def test_truncated_and_corrupt_files(tmp_path):
  path = tmp_path / "mem"
  _memory().save(path)
  keys_file = path / "keys.npy"
  data = keys_file.read_bytes()
  keys_file.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated"):
    load_memory(path)
  keys_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  with pytest.raises(ValueError, match="checksum"):
    load_memory(path)
  keys_file.write_bytes(data)
  load_memory(path)  # intact again
  (path / "residuals.npy").unlink()
  with pytest.raises(ValueError, match="missing"):
    load_memory(path)


def test_corrupt_scann_index_files(tmp_path):
  path = tmp_path / "mem"
  _memory("scann").save(path)
  index_files = sorted(p for p in (path / "index").iterdir() if p.is_file())
  assert index_files  # ScaNN wrote its own files, and the manifest covers them
  target = index_files[0]
  data = target.read_bytes()
  target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  with pytest.raises(ValueError, match="checksum"):
    load_memory(path)


def _signed(manifest):
  """``manifest`` with a valid manifest_sha256 (the documented canonical JSON), as an editor
  who knows the format would write it: what the deeper checks have to catch."""
  body = {name: value for name, value in manifest.items() if name != "manifest_sha256"}
  canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return dict(body, manifest_sha256=hashlib.sha256(canonical.encode()).hexdigest())


@pytest.fixture(name="scann_saved")
def fixture_scann_saved(tmp_path):
  path = tmp_path / "mem"
  _memory("scann").save(path)
  return path, json.loads((path / "manifest.json").read_text())


def _write_manifest(path, manifest):
  (path / "manifest.json").write_text(json.dumps(manifest))


def _changed(original, drop=(), **changes):
  manifest = json.loads(json.dumps(original))
  manifest.update(changes)
  for name in drop:
    del manifest[name]
  return manifest


def test_the_manifest_checks_itself(scann_saved):
  path, original = scann_saved
  assert original["manifest_sha256"] == _signed(original)["manifest_sha256"]
  center = original["index"]["center"]
  tampered = {
      "files emptied": _changed(original, files={}),
      "scann centre edited": _changed(original, index=dict(original["index"],
                                                           center=[c + 0.5 for c in center])),
      "backend swapped": _changed(original, backend="exact"),
      "field deleted": _changed(original, drop=["top_m"]),
      "checksum deleted": _changed(original, drop=["manifest_sha256"]),
      "n edited": _changed(original, n=999),
      "metadata edited": _changed(original, metadata={"step": 1}),
  }
  for what, manifest in tampered.items():
    _write_manifest(path, manifest)
    with pytest.raises(ValueError, match=r"manifest.json does not match its own checksum "
                                         r"\(manifest_sha256\): it was edited or damaged; "
                                         r"rebuild the memory") as err:
      load_memory(path)
    assert str(err.value).startswith(str(path / "manifest.json")), what
  for data, message in [(b"{not json", "is not valid JSON"), (b"[1, 2]", "is not a JSON object"),
                        (b"", "is not valid JSON"), (b"\x80\x81", "is not valid JSON")]:
    (path / "manifest.json").write_bytes(data)
    with pytest.raises(ValueError, match=f"manifest.json {message}.*; rebuild the memory"):
      load_memory(path)
  _write_manifest(path, original)
  assert load_memory(path).size == 400  # intact again


def test_a_re_signed_manifest_is_still_checked_field_by_field(scann_saved):
  path, original = scann_saved
  cases = [
      (_changed(original, files={}), r"lists no files \(files is empty\)"),
      (_changed(original, drop=["top_m"]), r"lacks the fields \['top_m'\]"),
      (_changed(original, extra=1), r"has unknown fields \['extra'\]"),
      (_changed(original, n="400"), r"field n has the wrong type \('400'\)"),
      (_changed(original, labels=1), r"field labels has the wrong type \(1\)"),
      (_changed(original, format_version=2), r"has format_version 2, this code reads 3"),
      (_changed(original, backend="annoy"), r"names backend 'annoy'"),
      (_changed(original, key_dtype="float64"), r"key_dtype must be one of \['float32'"),
      (_changed(original, top_m=None, residual_format="sparse"), r"field top_m is None"),
      (_changed(original, residual_dtypes={"values": "float32"}), r"residual_dtypes"),
      (_changed(original, files=dict(original["files"],
                                     **{"../x.npy": original["files"]["keys.npy"]})),
       r"files names '../x.npy'"),
      (_changed(original, files={k: v for k, v in original["files"].items() if k != "labels.npy"}),
       r"files lists the data files"),
      (_changed(original, files=dict(original["files"], **{"keys.npy": {"bytes": 1}})),
       r"files entry 'keys.npy' must be"),
      # Past the manifest's own checks: the files and the backend's load disagree.
      (_changed(original, n=999), r"keys array has shape \(400, 6\).*expected \(999, 6\)"),
      (_changed(original, backend="exact"),
       r"cannot load the exact index.*unknown exact index info"),
      (_changed(original, index=dict(original["index"], indexed=0)), "indexed count 0"),
      (_changed(original, index={"indexed": 400}), "index info lacks"),
      (_changed(original, index=dict(original["index"], center=[0.0])), "scann center has shape"),
      (_changed(original, labels=False, num_outputs=4,
                files={k: v for k, v in original["files"].items() if k != "labels.npy"}),
       "labels.npy is not listed in the manifest"),
  ]
  for manifest, message in cases:
    _write_manifest(path, _signed(manifest))
    with pytest.raises(ValueError, match=message) as err:
      load_memory(path)
    assert "rebuild the memory" in str(err.value), message
  _write_manifest(path, _signed(_changed(original, residual_dtypes={"residuals": "float16"})))
  with pytest.raises(ValueError,
                     match=r"residuals.npy has shape .* the manifest says any shape float16"):
    load_memory(path)
  _write_manifest(path, original)
  assert load_memory(path).size == 400


def test_files_must_be_exactly_those_listed(scann_saved):
  path, original = scann_saved
  (path / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"mem/notes.txt is not listed in the manifest .*\(an extra "
                                       r"file\); rebuild the memory"):
    load_memory(path)
  (path / "notes.txt").unlink()
  (path / "index" / "extra.pb").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"index/extra.pb is not listed"):
    load_memory(path)
  (path / "index" / "extra.pb").unlink()
  (path / "index" / "scann_config.pb").unlink()
  with pytest.raises(ValueError, match=r"index/scann_config.pb listed in the manifest is missing"):
    load_memory(path)
  assert original["files"]


def test_scann_load_never_writes_into_the_memory(tmp_path):
  # A re-signed manifest naming scann over an exact memory (no ScaNN files): ScaNN would write a
  # scann_assets.pbtxt of its own into the folder; the index refuses first.
  path = tmp_path / "mem"
  _memory("exact").save(path)
  exact_manifest = json.loads((path / "manifest.json").read_text())
  scann_info = {"indexed": 400, "center": [0.0] * 6, "scale_exponent": 0,
                "requested": {}, "options": {"mode": "brute_force", "distance": "mips_l2",
                                             "reorder": 0}}
  _write_manifest(path, _signed(_changed(exact_manifest, backend="scann", index=scann_info)))
  with pytest.raises(ValueError, match="scann_assets.pbtxt is missing"):
    load_memory(path)
  assert os.listdir(path / "index") == []


def test_missing(tmp_path):
  with pytest.raises(FileNotFoundError):
    load_memory(tmp_path / "nothing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="manifest"):
    load_memory(tmp_path / "empty")


def test_a_fifo_in_place_of_a_memory_file_is_refused_without_blocking(tmp_path):
  import signal
  path = tmp_path / "mem"
  _memory("exact").save(path)
  (path / "residuals.npy").unlink()
  os.mkfifo(path / "residuals.npy")
  signal.alarm(30)  # a regression would block on the FIFO's open: fail instead of hanging
  try:
    with pytest.raises(ValueError, match=r"residuals.npy is not a regular file"):
      load_memory(path)
    os.unlink(path / "manifest.json")
    os.mkfifo(path / "manifest.json")
    with pytest.raises((ValueError, FileNotFoundError)):
      load_memory(path)
  finally:
    signal.alarm(0)


def test_a_full_disk_is_named_even_when_the_serializer_says_only_io_error(tmp_path, monkeypatch):
  import errno
  from resmem_jax.memory import io as memory_io
  memory = _memory("exact")

  def failing_save(directory):
    raise RuntimeError("INTERNAL: I/O error")

  monkeypatch.setattr(memory.index, "save", failing_save)
  real_statvfs = os.statvfs
  with pytest.raises(RuntimeError, match="I/O error"):  # space left: the error as it came
    memory.save(tmp_path / "a")
  full = lambda p: os.statvfs_result((4096, 4096, 100, 0, 0, 100, 0, 0, 0, 255))
  monkeypatch.setattr(memory_io.os, "statvfs", full)
  with pytest.raises(OSError, match=r"disk full: no space left to save the memory in .*I/O error"
                     ) as caught:
    memory.save(tmp_path / "b")
  assert caught.value.errno == errno.ENOSPC
  monkeypatch.setattr(memory_io.os, "statvfs", real_statvfs)
  assert sorted(os.listdir(tmp_path)) == []  # nothing left behind
