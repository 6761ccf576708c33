"""Imported first by every binary: quiet TensorFlow's C++ logs and Orbax's per-step INFO chatter.

TensorFlow itself is not imported here: resmem_jax.data hides accelerators from it when (and only
when) a TFDS data set is loaded, so the embedded digits path never pays for the import.
"""
import contextlib
import logging as _logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _QuietOrbaxInfo(_logging.Filter):
  """Orbax logs every checkpoint step's internals at INFO; keep its warnings, drop the chatter.

  Some Orbax records name absl's logging module as their source, so the filter looks at the
  calling frames rather than ``record.pathname``.
  """

  def filter(self, record):
    if record.levelno >= _logging.WARNING:
      return True
    frame = sys._getframe(1)  # pylint: disable=protected-access
    for _ in range(16):
      if frame is None:
        break
      if "/orbax/" in frame.f_code.co_filename:
        return False
      frame = frame.f_back
    return True


_logging.getLogger("absl").addFilter(_QuietOrbaxInfo())


@contextlib.contextmanager
def config_errors():
  """A bad config field ends the binary with one line naming it (no traceback)."""
  from resmem_jax import settings  # pylint: disable=g-import-not-at-top
  try:
    yield
  except settings.SettingsError as err:
    raise SystemExit(f"config error: {err}") from None
