"""The errors whose message is meant for the user as it is, one class per kind.

Command lines print such an error as one line (`<prog>: error: <message>`) and exit with
code 1; anything else is a bug and keeps its traceback. Messages are one line and say
what to change. The classes live here, not in the command-line module, because the
library raises them without importing any command line.
"""


class UserError(Exception):
  """An error caused by the user's input (config, paths, data, disk); one-line message."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the key and the fix."""


class NotWritableError(UserError, OSError):
  """An output directory that does not take files."""


class DistributedSetupError(UserError, RuntimeError):
  """Multi-process flags or environment that cannot start JAX's distributed runtime."""


class TrainingDivergedError(UserError, FloatingPointError):
  """The loss, gradients or parameters became NaN/inf; nothing non-finite was saved."""


class EvalError(UserError, ValueError):
  """A checkpoint/data/flag problem of an evaluation."""


class CheckpointFormatError(UserError, ValueError):
  """A file that is not a readable checkpoint of the expected format."""


class TorchNotInstalledError(UserError, ImportError):
  """Reading a .pth file needs torch, which is not installed."""


class NotACheckpointError(UserError, FileNotFoundError):
  """A directory that holds no model checkpoint."""


class CheckpointMismatchError(UserError, ValueError):
  """A stored checkpoint does not fit the model/optimizer being trained."""


class CheckpointWriteError(UserError, OSError):
  """A model checkpoint cannot be written (exists, unwritable, disk full)."""


class CheckpointSaveError(UserError, OSError):
  """Writing a training checkpoint failed; the message names the step, the directory, the
  cause, the size needed and the intact checkpoint a rerun resumes from (or none)."""


class DatasetNotFoundError(UserError, FileNotFoundError):
  """A dataset is missing or not prepared; the message says what to download and where."""


class EmptyClassFolderError(UserError, ValueError):
  """A class folder of an image-folder dataset holds no image (torchvision"s ImageFolder
  refuses those too); the message names the folder."""


class UndecodableImageError(UserError, ValueError):
  """Image files of a folder dataset that TF cannot decode; the message names the first."""


class CheckpointDamagedError(UserError, ValueError):
  """No training checkpoint of a workdir can be read back (truncated, missing or garbled
  files, no commit marker); the message names each step, why, and that nothing changed."""
