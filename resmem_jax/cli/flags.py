"""What every command-line tool shares: a ``--config`` that takes a packaged config's name or a
file, quiet output (one line per phase; ``--verbose`` shows every library's logs), ``--print_config``,
a ``--help`` that says what the tool does, its flags, the packaged configs and an example, and one
line, not a traceback, for an ordinary mistake (``--verbose`` keeps the traceback).

Import this module before TensorFlow is loaded (the tools import it first): TensorFlow reads its
log level from the environment once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import pathlib
import re
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ INFO / WARNING lines

from absl import app  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show every library's log lines (absl INFO, TFDS progress bars, ScaNN's "
    "native logs) instead of one line per phase, and the traceback behind a one-line error.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config, every field with its value and meaning, "
    "and exit without running anything.")
PHASE_LOGGER = "resmem_jax"


def define_config(help_text: str = "A packaged config by name (digits, mnist:serving, ...; see "
                                   "resmem_jax/configs) or a config file path[:variant].",
                  required: bool = True):
  """The ``--config`` flag (an ml_collections config file, overridable as ``--config.a.b=v``)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  holder = config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)
  if required:
    flags.mark_flag_as_required("config")
  return holder


@dataclasses.dataclass(frozen=True)
class Tool:
  """What ``--help`` says about a tool: its command, what it does (two lines) and one example."""
  command: str
  about: str
  example: str


HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
README = "README.md in the source tree (quick start, every tool, the data sets)"


def run(main, tool: Tool | None = None) -> None:
  """``absl.app.run(main)`` with the shared behaviour of every tool (see the module docstring).

  ``tool`` is what ``--help`` says; without it, the first line of ``main``'s module docstring.
  """
  tool = tool or _tool_from_docstring(main)
  if any(arg in HELP_ARGS for arg in sys.argv[1:]):
    print(help_text(main, tool))
    raise SystemExit(0)
  app.run(lambda argv: _main(main, argv), argv=resolve_config_names(sys.argv),
          flags_parser=lambda argv: _parse_flags(argv, tool.command))


def _tool_from_docstring(main) -> Tool:
  doc = (sys.modules[main.__module__].__doc__ or "").strip()
  lines = doc.splitlines()
  examples = [l.strip() for l in lines if l.startswith("  ") and l.strip()]
  command = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "the tool"
  return Tool(command=command, about=lines[0] if lines else "",
              example=examples[0] if examples else "")


def config_variants() -> dict[str, tuple[str, ...]]:
  """Packaged config name -> its named variants (each config module's ``VARIANTS``; ``''``, the
  default, left out)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from resmem_jax import configs  # pylint: disable=g-import-not-at-top
  return {name: tuple(v for v in importlib.import_module(f"resmem_jax.configs.{name}").VARIANTS if v)
          for name in configs.NAMES}


def config_list(indent: str = "  ") -> str:
  """Each packaged config: its name, the first line of its docstring and its variants."""
  import importlib  # pylint: disable=g-import-not-at-top
  rows = []
  for name, variants in config_variants().items():
    doc = (importlib.import_module(f"resmem_jax.configs.{name}").__doc__ or "").strip()
    about = doc.splitlines()[0].replace("``", "").rstrip(".") + "." if doc else ""
    if variants:
      about += f" Variants: {', '.join(variants)}."
    head = f"{indent}{name:16s}  "
    rows.append(textwrap.fill(about, width=100, initial_indent=head,
                              subsequent_indent=" " * len(head)))
  return "\n".join(rows)


def _placeholder(flag) -> str:
  if flag.name == "workdir":
    return "DIR"
  if isinstance(flag.parser, flags.EnumParser):
    return "|".join(flag.parser.enum_values)
  if isinstance(flag.parser, flags.ListParser):
    return "V1,V2,..."
  if isinstance(flag.parser, flags.IntegerParser):
    return "N"
  if isinstance(flag.parser, flags.FloatParser):
    return "X"
  return "VALUE"


def _describe_flag(flag) -> str:
  head = f"--{flag.name}" if flag.boolean else f"--{flag.name}={_placeholder(flag)}"
  text = " ".join((flag.help or "").split())
  if isinstance(flag.parser, flags.EnumParser):  # absl prefixes "<a|b>: ", said by the placeholder
    text = re.sub(r"^<[^>]*>: ", "", text)
  if flag.name == "workdir":
    text = f"(required) {text}"
  elif not flag.boolean and flag.default not in (None, "", []):
    default = flag.serializer.serialize(flag.default) if flag.serializer else str(flag.default)
    text += f" (default: {default})"
  body = textwrap.fill(text, width=100, initial_indent="      ", subsequent_indent="      ")
  return f"  {head}\n{body}"


def help_text(main, tool: Tool) -> str:
  """``--help``: what the tool does, its own flags (absl's and JAX's stay in ``--helpfull``), the
  packaged configs, an example and where to read more."""
  own = list(flags.FLAGS.get_flags_for_module(main.__module__))
  names = {f.name for f in own}
  takes_config = "config" in flags.FLAGS
  usage = f"{tool.command}{' --config=NAME[:VARIANT]' if takes_config else ''} --workdir=DIR"
  lines = [f"usage: {usage} [flags]", "", tool.about.strip(), "", "Flags:"]
  if takes_config:
    lines += [
        "  --config=NAME[:VARIANT] or --config=path/to/config.py[:VARIANT]",
        "      (required) A packaged config (listed below) or an ml_collections config file.",
        "  --config.SECTION.FIELD=VALUE",
        "      Override one field of the config, e.g. --config.train.num_epochs=3 (--print_config",
        "      lists every field with its meaning)."]
  for flag in own:
    if flag.name != "config":
      lines.append(_describe_flag(flag))
  for name in ("print_config", "verbose"):
    if name not in names and (takes_config or name != "print_config"):
      lines.append(_describe_flag(flags.FLAGS[name]))
  if takes_config:
    lines += ["", "Packaged configs (--config=NAME or --config=NAME:VARIANT):",
              config_list()]
  lines += ["", "Example:", f"  {tool.example}", "", f"More: {README}.",
            "--helpfull lists every flag, absl's and JAX's included."]
  return "\n".join(lines)


def missing_config_line(command: str) -> str:
  names = ", ".join(f"{n}[:{'|'.join(v)}]" if v else n for n, v in config_variants().items())
  return (f"config error: --config is required: a packaged config ({names}) or a config file "
          f"path[:variant]; {command} --help says more")


def _main(main, argv):
  _set_up_logging(hide=not _VERBOSE.value)
  if _PRINT_CONFIG.value:
    if "config" not in flags.FLAGS:
      raise app.UsageError("--print_config needs a tool that takes --config")
    from resmem_jax import settings  # pylint: disable=g-import-not-at-top
    with user_errors():
      print(settings.describe(settings.from_config(flags.FLAGS["config"].value)))
    return 0
  with user_errors():
    if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
      from resmem_jax import mesh, settings  # pylint: disable=g-import-not-at-top
      # The one place a process joins a multi-host run: once, before the tool asks JAX anything.
      mesh.initialize_distributed(settings.from_config(flags.FLAGS["config"].value).train)
    return main(argv)


def _set_up_logging(hide: bool) -> None:
  """Quiet: libraries log errors only and the run's own phase lines (and warnings) go to stdout,
  plainly."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from resmem_jax import quiet  # pylint: disable=g-import-not-at-top
  phases = logging.getLogger(PHASE_LOGGER)
  phases.setLevel(logging.INFO)
  if not phases.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    phases.addHandler(handler)
  phases.propagate = False
  if hide:
    absl_logging.set_verbosity(absl_logging.ERROR)
    for name in ("jax", "tensorflow", "orbax", "absl"):
      logging.getLogger(name).setLevel(logging.ERROR)
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      tfds.disable_progress_bar()
    except ImportError:
      pass
    os.environ.pop(quiet.VERBOSE_ENV, None)
  else:
    absl_logging.set_verbosity(absl_logging.INFO)
    os.environ[quiet.VERBOSE_ENV] = "1"


def resolve_config_names(argv: list[str]) -> list[str]:
  """``--config=NAME[:VARIANT]`` with a packaged config's name -> that config file's path."""
  from resmem_jax import configs  # pylint: disable=g-import-not-at-top
  out, take_next = [], False
  for arg in argv:
    if take_next or arg.startswith("--config="):
      value = arg if take_next else arg[len("--config="):]
      name, sep, variant = value.partition(":")
      if not name.endswith(".py") and os.sep not in name and not pathlib.Path(name).exists():
        try:
          value = f"{configs.path(name)}{sep}{variant}"
        except ValueError as err:
          raise SystemExit(f"config error: {err}") from None
      arg = value if take_next else f"--config={value}"
    take_next = arg == "--config"
    out.append(arg)
  return out


@contextlib.contextmanager
def user_errors():
  """An ordinary mistake (a bad config field, a workdir that does not match, a missing optional
  dependency, data that cannot be had) ends the tool with one line saying what and how to go on;
  ``--verbose`` lets the traceback through instead."""
  try:
    yield
  except Exception as err:  # pylint: disable=broad-except  # re-raised unless a user error
    line = user_error_line(err)
    if line is None or _verbose():
      raise
    raise SystemExit(line) from None


def _verbose() -> bool:
  return flags.FLAGS.is_parsed() and _VERBOSE.value


def user_error_line(err: BaseException) -> str | None:
  """The one line for a user error (see user_errors); None for a bug, which keeps its traceback."""
  from resmem_jax import settings  # pylint: disable=g-import-not-at-top
  from resmem_jax.data import tfds_prepare  # pylint: disable=g-import-not-at-top
  from resmem_jax.training import checkpoints, loop, provenance  # pylint: disable=g-import-not-at-top
  if isinstance(err, loop.TrainingDiverged):  # a SettingsError, found while training
    return f"training error: {err}"
  if isinstance(err, settings.SettingsError):
    return f"config error: {err}"
  if isinstance(err, (provenance.WorkdirError, checkpoints.CheckpointError)):
    return f"workdir error: {err}"
  if isinstance(err, settings.MissingDependency):
    return f"missing dependency: {err}"
  if isinstance(err, tfds_prepare.DataUnavailable):
    return f"data error: {_first_line(err)}"
  if isinstance(err, OSError):
    return f"file error: {os_error_line(err)}"
  return None


def _first_line(err: BaseException) -> str:
  lines = str(err).strip().splitlines()
  return lines[0] if lines else type(err).__name__


# errno -> (what happened, what to do), for the faults a workdir meets.
_OS_FAULTS = {
    errno.ENOSPC: ("disk full (no space left on the device)", "free some space and run again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space and run again"),
    errno.EROFS: ("read-only file system", "use a --workdir on a writable file system"),
    errno.EACCES: ("permission denied", "use a --workdir you can write, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "use a --workdir you can write, or fix its "
                  "permissions"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another --workdir"),
    errno.EEXIST: ("the path exists and is not a folder", "choose another --workdir, or move "
                   "the file"),
    errno.EIO: ("input/output error", "check the disk, then run again"),
}


def os_error_line(err: OSError) -> str:
  """One line for an OSError: what happened, on which path, and what to do."""
  where = " ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
  known = None if err.errno is None else _OS_FAULTS.get(err.errno)
  if known is None:
    detail = (err.strerror or str(err) or type(err).__name__).strip().splitlines()[0]
    return f"{detail}{': ' + where if where else ''}"
  strerror = str(err.strerror or "")
  if err.filename is None and strerror.startswith("disk full"):
    return strerror.splitlines()[0]  # the memory's save already said where and what to do
  what, fix = known
  detail = "" if err.filename is not None or not str(err) else f" ({str(err).splitlines()[0][:300]})"
  return f"{what}{': ' + where if where else ''}{detail}; {fix}"


def _parse_flags(argv, command: str = "the tool"):
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      # A config file that failed to load surfaces only when its value is used: use it now.
      config = flags.FLAGS["config"].value
      if config is not None:  # None: not given (a required --config already failed to parse)
        config.to_dict()
    return remaining
  except Exception as err:  # pylint: disable=broad-except  # absl / ml_collections raise many types
    if "config" in flags.FLAGS and "Flag --config must have a value other than None" in str(err):
      raise SystemExit(missing_config_line(command)) from None
    message = _flag_error(err, argv)
    kind = "config" if "config" in message.split(":")[0] or "config field" in message else "flag"
    raise SystemExit(f"{kind} error: {message}") from None


def _flag_error(err: Exception, argv) -> str:
  """One line saying what is wrong with the command line."""
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
