"""The one description of how two trees of arrays differ in structure or shapes.

Every "this checkpoint does not fit that model" message is built here: trees of arrays
(restoring a training checkpoint, evaluating a converted one, fine-tuning from one) by
path, PyTorch state dicts (the converters) by key.
"""

from typing import Any

import numpy as np
from flax import traverse_util


def shape_map(tree: Any) -> dict[str, tuple]:
  """{'a/b/c': shape} of the leaves of a nested dict (arrays, ShapeDtypeStructs or orbax
  metadata); empty sub-dicts are dropped."""
  flat = traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else {}
  return {
      k: tuple(getattr(v, "shape", np.shape(v)))
      for k, v in flat.items()
      if not (isinstance(v, dict) and not v)
  }


def mismatches(
    stored: dict,
    expected: dict,
    stored_name: str = "the checkpoint",
    expected_in: str = "in the model",
) -> list[str]:
  """What differs between two {path: shape} maps, one phrase per path, sorted by path."""
  problems = []
  for k in sorted(set(stored) | set(expected)):
    if k not in stored:
      problems.append(f"{k} missing from {stored_name}")
    elif k not in expected:
      problems.append(f"{k} not in the model")
    elif tuple(stored[k]) != tuple(expected[k]):
      problems.append(
          f"{k} is {tuple(stored[k])} in {stored_name} but " f"{tuple(expected[k])} {expected_in}"
      )
  return problems


def summarize(problems: list[str], limit: int = 3) -> str | None:
  """None for no problems, else the first `limit` joined with '; ' and how many more."""
  if not problems:
    return None
  more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
  return "; ".join(problems[:limit]) + more


def describe_mismatch(stored: dict, expected: dict, limit: int = 3, **names) -> str | None:
  """None when the two {path: shape} maps agree, else a short description."""
  return summarize(mismatches(stored, expected, **names), limit)


def limited(names, n: int = 6) -> str:
  """The first `n` names, sorted, and how many more."""
  names = sorted(names)
  return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def key_report(missing, unexpected, mismatched) -> str | None:
  """None when a state dict matched, else 'missing: ...; unexpected: ...; shape mismatch:
  ...' (the converters' accounting of state-dict keys)."""
  problems = [
      f"{label}: {limited(names)}"
      for label, names in (
          ("missing", missing),
          ("unexpected", unexpected),
          ("shape mismatch", mismatched),
      )
      if names
  ]
  return "; ".join(problems) or None
