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
def user_errors():
  """An ordinary mistake (a bad config field, a workdir that does not match) ends the binary
  with one line saying what and how to go on, not a traceback."""
  from resmem_jax import settings  # pylint: disable=g-import-not-at-top
  from resmem_jax.training import checkpoints, provenance  # pylint: disable=g-import-not-at-top
  try:
    yield
  except settings.SettingsError as err:
    raise SystemExit(f"config error: {err}") from None
  except (provenance.WorkdirError, checkpoints.CheckpointError) as err:
    raise SystemExit(f"workdir error: {err}") from None


def run(main) -> None:
  """``absl.app.run(main)``, but a mistake in the flags or the config file (a missing file, an
  unknown variant, a typo in a ``--config.`` override) ends with one line, not a traceback."""
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      # A config file that failed to load surfaces only when its value is used: use it now.
      flags.FLAGS["config"].value.to_dict()
    return remaining
  except Exception as err:  # pylint: disable=broad-except  # absl / ml_collections raise many types
    raise SystemExit(f"config error: {_flag_error(err, argv)}") from None


def _flag_error(err: Exception, argv) -> str:
  """One line saying what is wrong with the command line."""
  import re  # pylint: disable=g-import-not-at-top
  from resmem_jax import settings  # pylint: disable=g-import-not-at-top
  text = str(err)
  overrides = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
  unknown = re.search(r"Unknown command line flag '([^']+)'", text)
  if unknown and unknown.group(1).startswith("config."):
    return settings.unknown_field_message(unknown.group(1)[len("config."):])
  typo = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
  if typo:
    path = next((o for o in overrides if o.split(".")[-1] == typo.group(2)), typo.group(2))
    return settings.unknown_field_message(path)
  missing = re.search(r"\[Errno \d+\] ([^:]+): '([^']+)'", text)
  if missing:
    return f"cannot load the --config file {missing.group(2)}: {missing.group(1)}"
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if "Traceback" in text:  # the config file itself raised: its message is the last line
    flag = lines[0].split(": Error whilst", 1)[0]
    return f"{flag}: {lines[-1]}"
  return " ".join(lines)[:500] or type(err).__name__
