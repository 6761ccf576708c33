"""Imported first by every binary: keeps TensorFlow's C++ logging quiet and off the GPU/TPU."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
try:  # TFDS only feeds data; JAX owns the accelerators.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
except ImportError:  # pragma: no cover - tensorflow is optional for the library
  pass

import logging as _logging


class _QuietOrbaxInfo(_logging.Filter):
  """Orbax logs every checkpoint step's internals at INFO; keep its warnings, drop the chatter."""

  def filter(self, record):
    return record.levelno >= _logging.WARNING or "orbax" not in record.pathname


_logging.getLogger("absl").addFilter(_QuietOrbaxInfo())
