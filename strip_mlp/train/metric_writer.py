"""metrics.jsonl (one JSON object per line) and, optionally, TensorBoard scalars.

Only process 0 writes. Rows of steps after the step a run resumes from are dropped when
the file is opened, so every step appears once and the file plots as one run.
"""

import json
import os

import jax

from strip_mlp.checkpoints.train_checkpoint import METRICS_FILE


class MetricWriter:
  """metrics.jsonl (one JSON object per line) and optional TensorBoard, process 0 only.

  Rows of steps after `start_step` (written by an earlier run after the checkpoint that
  this run resumes from) are dropped when the file is opened, so every step appears once
  and the file plots as one run.
  """

  def __init__(self, workdir: str, tensorboard: bool = False, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    path = os.path.join(workdir, METRICS_FILE)
    _truncate_metrics(path, start_step)
    self._file = open(path, "a")
    if tensorboard:
      from strip_mlp.data import tensorboard as tb  # pylint: disable=g-import-not-at-top

      self._tb = tb.ScalarWriter(workdir)

  def write(self, step: int, kind: str, values: dict):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    self._file.write(json.dumps({"step": int(step), "kind": kind, **values}) + "\n")
    self._file.flush()
    if self._tb is not None:
      self._tb.write(step, kind, values)

  def close(self):
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _truncate_metrics(path: str, last_step: int):
  """Drops the rows of `path` (metrics.jsonl) whose step is after `last_step`."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
  if len(keep) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)
  print(
      f"metrics: dropped {len(lines) - len(keep)} row(s) after step {last_step} from {path} "
      "(logged after the checkpoint this run resumes from)",
      flush=True,
  )
