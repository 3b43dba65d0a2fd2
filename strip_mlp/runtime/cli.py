"""Command-line plumbing shared by train.py and eval.py.

The flags both programs take (multi-process start, compilation cache), the one-line
messages for bad flags, config keys and config files, the checks of output directories,
and `guarded`, which turns every error a user can cause into `<prog>: error: <line>` with
exit code 1. TensorFlow is never imported here unless a program asks for it.
"""

import difflib
import os
import re
import sys
import tempfile
import traceback

from absl import flags
from absl import logging
import ml_collections

from strip_mlp.runtime import supervisor
from strip_mlp.errors import NotWritableError, UserError

DEFAULT_COMPILATION_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or "~/.cache", "strip_mlp", "jax_compilation_cache"
)
CONFIG_KEYS_DOC = "configs/common.py"


class UsageError(UserError, ValueError):
  """Bad or missing flags."""


# ----------------------------------------------------------------------------- flags


def define_process_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """--coordinator_address/--num_processes/--process_id/--heartbeat_timeout_seconds and
  --compilation_cache_dir."""
  flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0 for multi-process runs.", flag_values=fv
  )
  flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Index of this process.", flag_values=fv)
  flags.DEFINE_integer(
      "heartbeat_timeout_seconds",
      30,
      "Multi-process runs: a process that sends JAX's distributed runtime no heartbeat for "
      "this long (killed, out of memory, host gone) counts as dead and the others stop "
      "(train.py: with one line and exit code 75; rerunning the same command resumes).",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "compilation_cache_dir",
      None,
      "Persistent JAX compilation cache ('' turns it off; "
      "shared by train.py and eval.py). Default: $JAX_COMPILATION_CACHE_DIR, else "
      f"{DEFAULT_COMPILATION_CACHE}.",
      flag_values=fv,
  )


def start_processes(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Starts JAX's distributed runtime (when several processes run) and the persistent
  compilation cache, as the process flags say."""
  from strip_mlp.runtime import sharding  # pylint: disable=g-import-not-at-top  (imports jax)

  import jax  # pylint: disable=g-import-not-at-top

  started = sharding.maybe_initialize_distributed(
      fv.coordinator_address, fv.num_processes, fv.process_id, fv.heartbeat_timeout_seconds
  )
  sharding.enable_compilation_cache(compilation_cache_dir(fv.compilation_cache_dir))
  if started:
    supervisor.report(
        process=jax.process_index(),
        processes=jax.process_count(),
        coordinator=fv.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
    )


def compilation_cache_dir(flag_value: str | None) -> str:
  """--compilation_cache_dir, else $JAX_COMPILATION_CACHE_DIR, else the default; '' = off."""
  if flag_value is None:
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_COMPILATION_CACHE
  return flag_value


def quiet_logging(fv: flags.FlagValues = flags.FLAGS) -> None:
  """absl/orbax INFO chatter off unless --verbosity was given (-v 0 brings it back), and no
  search for a TPU where there is none (`skip_absent_tpu`)."""
  if "verbosity" not in fv or not fv["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  skip_absent_tpu()


def skip_absent_tpu() -> bool:
  """JAX on the CPU when libtpu is installed (the `tpu`/`test` extras, for compiling) but
  this machine has no TPU chip and no GPU plugin: JAX would otherwise start libtpu, which
  prints its failed search for TPU hosts on stderr. JAX_PLATFORMS, when set, is left as it
  is. Returns whether it chose the CPU. Call before JAX starts a backend."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  if os.environ.get("JAX_PLATFORMS") or not importlib.util.find_spec("libtpu"):
    return False
  if importlib.util.find_spec("jax_plugins"):  # a GPU plugin (CUDA, ROCm)
    return False
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top

    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except Exception:  # pylint: disable=broad-except  (a jax without it: let JAX decide)
    return False
  if chips:
    return False
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")
  return True


def parse_flags(
    argv: list[str], fv: flags.FlagValues = flags.FLAGS, config_flag: str = "config"
) -> list[str]:
  """Parses `argv` into `fv`; UsageError (one line) for an unknown or malformed flag, an
  unknown config key (with the closest key) and a config file that cannot be loaded.
  Returns the positional arguments (argv[0] included)."""
  try:
    rest = fv(argv)
  except flags.Error as e:
    raise UsageError(describe_flag_error(e)) from None
  except (AttributeError, KeyError) as e:
    raise UsageError(unknown_key_message(e, argv, fv[config_flag].value)) from None
  except Exception as e:  # pylint: disable=broad-except  (a config file's own code)
    raise UsageError(describe_config_load_error(config_path(fv, config_flag), e)) from None
  value = fv[config_flag].value
  if not isinstance(value, ml_collections.ConfigDict):
    raise UsageError(
        describe_config_load_error(config_path(fv, config_flag), getattr(value, "_error", None))
    )
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(rest[1:])} (flags are --name=value)")
  return rest


def config_path(fv: flags.FlagValues = flags.FLAGS, name: str = "config") -> str:
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  try:
    return config_flags.get_config_filename(fv[name])
  except (AttributeError, TypeError, KeyError):
    return str(fv[name].default)


def unknown_key_message(error: Exception, argv: list[str], config=None) -> str:
  """One line for `--config.<key>` that the config does not have, with the closest key."""
  bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
  what = str(error).strip("'\"").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
  hint = re.search(r'Did you mean "(\w+)"', str(error))
  guess = hint.group(1) if hint else _closest_key(bad, config)
  return (
      f"unknown config key {what} (in {' '.join(bad)})"
      + (f" (did you mean {guess!r}?)" if guess else "")
      + f"; the keys and their meaning are in {CONFIG_KEYS_DOC}"
  )


def _closest_key(bad: list[str], config) -> str | None:
  if not bad or not isinstance(config, ml_collections.ConfigDict):
    return None
  node, parts = config, bad[0][len("--config.") :].split(".")
  for p in parts[:-1]:
    node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict):
    return None
  close = difflib.get_close_matches(parts[-1], list(node.keys()), n=1)
  return close[0] if close else None


def apply_overrides(
    config: ml_collections.ConfigDict, fv: flags.FlagValues, name: str = "config"
) -> ml_collections.ConfigDict:
  """`config` with the value of every `--config.<key>` given on the command line."""
  prefix = name + "."
  for flag_name in list(fv):
    if flag_name.startswith(prefix) and fv[flag_name].present:
      node, parts = config, flag_name[len(prefix) :].split(".")
      for p in parts[:-1]:
        node = node[p]
      node[parts[-1]] = fv[flag_name].value
  return config


def describe_flag_error(error: Exception) -> str:
  """One line for an absl flag error. config_flags puts the whole traceback of a config
  file that raised (e.g. configs/cifar10.py:huge) into the message: its last line says it."""
  text = str(error)
  if "Traceback (most recent call last)" not in text:
    return " ".join(text.split())
  head = text.split(": Error whilst parsing config file")[0].split("\n")[0]
  last = [line.strip() for line in text.splitlines() if line.strip()][-1]
  return f"{head}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', last)}"


def describe_config_load_error(path: str, error: BaseException | None) -> str:
  """One line for a --config file that cannot be loaded: missing (config_flags keeps the
  IOError until the config is used) or raising something else while it runs."""
  if isinstance(error, OSError) or error is None:
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    why = lines[-1] if lines else "it cannot be read"
    return f"--config={path}: cannot load the config file ({why})"
  where = ""
  frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
  if frames:
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})"
  what = " ".join(str(error).split())
  return f"--config={path}: the config file raised {type(error).__name__}: {what}{where}"


# ----------------------------------------------------------------------------- checks


def check_writable_dir(path: str, what: str) -> None:
  """Creates directory `path` if needed and writes (and removes) a file in it.

  A real write, because permission bits say nothing for root or on read-only mounts.
  Remote paths (gs://..., s3://...) are left to their file system. Raises
  NotWritableError with one line.
  """
  if "://" in path:
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotWritableError(f"{what} {path} exists and is not a directory; give a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise NotWritableError(
        f"cannot create {what} {path} ({e.strerror or e}); give a writable directory"
    ) from None
  try:
    fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise NotWritableError(
        f"{what} {path} is not writable (writing a file there failed: "
        f"{e.strerror or e}); give a writable directory"
    ) from None


# ----------------------------------------------------------------------------- errors


def one_line(text) -> str:
  return " ".join(str(text).split())


def error_line(e: BaseException, out_of_memory_fix: str, os_error_suffix: str = "") -> str | None:
  """The one line for an error a user can cause (UserError, a full disk or missing
  permission, an unreadable data file, device memory exhausted); None for a bug."""
  if isinstance(e, UserError):
    return one_line(e)
  if isinstance(e, OSError):
    name = f" {e.filename}" if e.filename else ""
    return one_line(f"{e.strerror or e}{name} ({type(e).__name__}){os_error_suffix}")
  if type(e).__module__.startswith("tensorflow") and hasattr(e, "message"):
    return one_line(f"reading the data failed: {e.message}")  # tf.errors.OpError of tf.data
  if isinstance(e, RuntimeError) and "RESOURCE_EXHAUSTED" in str(e):
    return one_line(
        f"out of device memory ({str(e).strip().splitlines()[0][:300]}); " f"{out_of_memory_fix}"
    )
  return None


def guarded(prog: str, fn, *args, out_of_memory_fix: str, os_error_suffix: str = "") -> int:
  """Runs fn(*args); an error a user can cause becomes `<prog>: error: <line>` on stderr
  and exit code 1. Other exceptions (bugs, and collectives failed by a dead peer)
  propagate with their traceback, in a multi-process run only once JAX's runtime has had
  the time to say whether a process died (sharding.await_verdict_after_error)."""
  try:
    fn(*args)
  except Exception as e:  # pylint: disable=broad-except  (re-raised below unless ours)
    line = error_line(e, out_of_memory_fix, os_error_suffix)
    if line is None:
      if "strip_mlp.runtime.sharding" in sys.modules:  # JAX was started
        sys.modules["strip_mlp.runtime.sharding"].await_verdict_after_error()
      raise
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    return 1
  return 0
