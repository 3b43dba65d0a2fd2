"""Converts released PyTorch Strip-MLP weights to a Flax/orbax checkpoint (and back).

  python convert_torch_weights.py IN.pth OUT_DIR           # .pth -> orbax checkpoint
  python convert_torch_weights.py --to-torch CKPT_DIR OUT.pth   # checkpoint -> .pth

OUT_DIR then loads with `model, variables = strip_mlp.load_checkpoint(OUT_DIR)`; OUT.pth
loads into the official PyTorch model with `load_state_dict(sd['model'], strict=True)`.
"""
import argparse
import os
import sys


def _to_flax(src: str, dst: str) -> str:
  from strip_mlp.checkpoint import save_checkpoint
  from strip_mlp.convert import torch_to_flax
  model, variables = torch_to_flax(src)
  save_checkpoint(dst, model, variables)
  cfg = model.config_dict()
  return (f"converted {src} -> {dst}: embed_dim={cfg['embed_dim']} layers={cfg['layers']} "
          f"img_size={cfg['img_size']} num_classes={cfg['num_classes']}")


def _to_torch(src: str, dst: str) -> str:
  import torch
  from strip_mlp.checkpoint import load_checkpoint
  from strip_mlp.convert import flax_to_torch
  _, variables = load_checkpoint(src)
  if os.path.exists(dst):
    raise FileExistsError(f"{dst} already exists; choose a new output file")
  tmp = f"{dst}.tmp-{os.getpid()}"
  try:
    torch.save({"model": flax_to_torch(variables)}, tmp)
    os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return f"wrote PyTorch state dict {dst} from {src}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("src", help="IN.pth (or a checkpoint directory with --to-torch)")
  parser.add_argument("dst", help="OUT_DIR for the orbax checkpoint (or OUT.pth)")
  parser.add_argument("--to-torch", action="store_true",
                      help="convert a Flax checkpoint directory back to a .pth file")
  args = parser.parse_args(argv)
  try:
    print((_to_torch if args.to_torch else _to_flax)(args.src, args.dst))
  except (ValueError, OSError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
