"""Converts released PyTorch weights to a Flax/orbax checkpoint (and back): Strip-MLP, and
PoolFormer, RaftMLP and MS-MLP (the family is read from the state dict's keys).

  python convert_torch_weights.py IN.pth OUT_DIR                 # .pth -> orbax checkpoint
  python convert_torch_weights.py --to-torch CKPT_DIR OUT.pth    # checkpoint -> .pth
  python convert_torch_weights.py --to-torch WORKDIR OUT.pth [--step N | --which best] [--ema]

OUT_DIR then loads with `model, variables = strip_mlp.load_checkpoint(OUT_DIR)`; OUT.pth
loads into the official PyTorch model with `load_state_dict(sd['model'], strict=True)`.
--to-torch reads what eval.py reads: a directory written by this script, or a train.py
workdir (also its checkpoints/ or one step directory), whose latest checkpoint (--step N,
--which best) and raw weights (--ema: the EMA weights) are exported by default.
Nothing that exists is overwritten, and a failed run leaves no partial output. Errors are
one line on stderr: exit code 1 (2 for a wrong command line).
"""

import argparse
import os
import sys
import tempfile

from strip_mlp.errors import UserError

PROG = "convert_torch_weights.py"


class ConvertError(UserError):
  """The input or the output of a conversion is not usable; the message says what to do."""


class UsageError(UserError):
  """A wrong command line."""


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(f"{message} (see --help)")


def _check_new_file(dst: str) -> None:
  if os.path.lexists(dst):
    kind = "a directory" if os.path.isdir(dst) else "a file"
    raise ConvertError(
        f"{dst} already exists ({kind}); choose a new output file (nothing is "
        "overwritten) or delete it first"
    )


def _to_flax(args) -> str:
  # pylint: disable-next=g-import-not-at-top
  from strip_mlp.checkpoints.model_checkpoint import save_checkpoint
  from strip_mlp.models import registry  # pylint: disable=g-import-not-at-top

  if args.step is not None or args.which is not None or args.ema is not None:
    raise UsageError(
        "--step, --which and --ema select a training checkpoint: they apply to " "--to-torch only"
    )
  if os.path.isdir(args.src):
    raise ConvertError(
        f"{args.src} is a directory, not a PyTorch .pth file; to export a "
        f"checkpoint directory or train.py workdir to .pth use --to-torch "
        f"{args.src} OUT.pth"
    )
  model, variables = registry.torch_to_flax(args.src)
  dst = save_checkpoint(args.dst, model, variables)
  return f"converted {args.src} -> {dst}: {registry.family_of_model(model).describe(model)}"


def _to_torch(args) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  from strip_mlp.checkpoints import model_checkpoint  # pylint: disable=g-import-not-at-top
  from strip_mlp.runtime import sharding  # pylint: disable=g-import-not-at-top
  from strip_mlp.models import registry  # pylint: disable=g-import-not-at-top

  dst = os.path.abspath(args.dst)
  _check_new_file(dst)
  if os.path.isfile(args.src):
    raise ConvertError(
        f"{args.src} is a file; --to-torch exports a checkpoint directory (from "
        "this script) or a train.py workdir; to convert a .pth file to a "
        "checkpoint directory, drop --to-torch"
    )
  mesh = sharding.create_mesh(1, jax.local_devices()[:1])
  ckpt = model_checkpoint.load_weights(
      args.src, step=args.step, which=args.which, ema=args.ema, mesh=mesh
  )
  state_dict = _as_torch(registry.variables_to_state_dict(ckpt.model, ckpt.variables))
  write_new_file(dst, lambda f: _torch_save({"model": state_dict}, f))
  return f"wrote PyTorch state dict {dst} from {ckpt.describe()}"


def _as_torch(state_dict):
  import torch  # pylint: disable=g-import-not-at-top

  return {k: torch.from_numpy(v) for k, v in state_dict.items()}


def _torch_save(obj, f) -> None:
  import torch  # pylint: disable=g-import-not-at-top

  torch.save(obj, f)


def write_new_file(dst: str, write) -> None:
  """Creates `dst` with `write(binary file)`: written to a temporary file in the same
  directory and renamed into place, so `dst` never exists half-written; on any failure the
  temporary file is removed and a ConvertError (one line) says why. Refuses an existing
  `dst`."""
  _check_new_file(dst)
  parent = os.path.dirname(os.path.abspath(dst))
  try:
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
  except OSError as e:
    raise ConvertError(
        f"cannot write {dst}: {e.strerror}; choose a writable output " "location"
    ) from None
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates it private
    _check_new_file(dst)  # created meanwhile?
    os.replace(tmp, dst)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, UserError):
      # pylint: disable-next=g-import-not-at-top
      from strip_mlp.checkpoints.storage_errors import storage_error_reason

      raise ConvertError(
          f"cannot write {dst}: {storage_error_reason(e)[1]}; nothing was "
          "written: free up space or choose another output location"
      ) from e
    raise


def main(argv=None) -> int:
  parser = _Parser(
      prog=PROG,
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n".join(__doc__.splitlines()[2:]),
  )
  parser.add_argument(
      "src", help="IN.pth (or, with --to-torch, a checkpoint directory or a " "train.py workdir)"
  )
  parser.add_argument("dst", help="OUT_DIR for the orbax checkpoint (or OUT.pth)")
  parser.add_argument(
      "--to-torch",
      action="store_true",
      help="export a checkpoint directory or training workdir to a .pth file",
  )
  parser.add_argument(
      "--step",
      type=int,
      default=None,
      help="training workdirs: export this step (default: the latest)",
  )
  parser.add_argument(
      "--which",
      choices=["latest", "best"],
      default=None,
      help="training workdirs without --step: the latest checkpoint "
      "(default) or the best by eval top-1",
  )
  parser.add_argument(
      "--ema",
      action=argparse.BooleanOptionalAction,
      default=None,
      help="training workdirs: export the EMA weights (default: the raw ones)",
  )
  try:
    args = parser.parse_args(argv)
    print((_to_torch if args.to_torch else _to_flax)(args))
  except (UserError, OSError, ImportError) as e:
    message = " ".join(str(e).split())  # one line, whatever the message holds
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2 if isinstance(e, UsageError) else 1
  return 0


if __name__ == "__main__":
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.ERROR)  # orbax's INFO/WARNING chatter
  sys.exit(main())
