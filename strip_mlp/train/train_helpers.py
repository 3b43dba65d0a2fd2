"""The small objects the train loop is made of: progress, checkpoint saves, preemption.

`Progress` holds the metrics of the steps since the last log line, checks them for NaN/inf
when it fetches them, and logs/writes their mean. `Saver` starts checkpoint saves and says
"saved" only once orbax has committed a step. `PreemptionWatcher` turns SIGTERM/Ctrl-C into
a flag all processes agree on. Process 0 alone prints.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import threading
import time

import flax
import jax
import numpy as np
from jax.experimental import multihost_utils

from strip_mlp.runtime import supervisor
from strip_mlp.checkpoints.train_checkpoint import CONFIG_FILE, Checkpointer


def log(msg: str):
  """stdout from process 0 only."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def fmt_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def is_time(step: int, every: float) -> bool:
  """Whether `step` is the first step at or after a multiple of `every` (> 0, may be
  fractional: every=112.3 gives 113, 225, 337, ...; an integer gives its multiples)."""
  return step // every > (step - 1) // every


def first_nonfinite(step_metrics: list[dict], first_step: int):
  """(step, [what is not finite], that step's metrics) of the first step of `step_metrics`
  (host values, step `first_step` onwards) with a non-finite loss, gradient norm or
  parameter; None when all are finite."""
  for i, m in enumerate(step_metrics):
    bad = [
        name
        for name, ok in (
            ("loss", np.isfinite(m["loss"])),
            ("gradients", np.isfinite(m["grad_norm"])),
            ("parameters", m["params_finite"] > 0),
        )
        if not ok
    ]
    if bad:
      return first_step + i, bad, m
  return None


def divergence_message(step: int, bad: list[str], metrics: dict, last_good: str | None) -> str:
  """One line: what became non-finite at `step`, the likely cause, and where to resume."""
  if "loss" in bad:
    cause = (
        f"the loss is {metrics['loss']}: training diverged (lower lr.base or raise the "
        "warmup) or the data holds non-finite values"
    )
  else:
    cause = (
        f"the loss was still finite ({metrics['loss']:.4g}), so this is a numerical "
        "fault in the backward pass or the update, not a learning-rate problem; please "
        "report it with the workdir's config.json"
    )
  resume = (
      f"the last checkpoint, {last_good}, is finite and a rerun resumes from it"
      if last_good
      else "no checkpoint was saved, so a rerun starts from scratch"
  )
  return (
      f"at step {step} the {' and '.join(bad)} became non-finite; {cause}. Stopped "
      f"without saving ({resume})."
  )


class Progress:
  """Step metrics since the last log line: `add` per step, `flush` to fetch, check, log.

  `flush(step)` returns the first non-finite step as `first_nonfinite` does (nothing is
  logged then), else logs the mean and returns None. Time spent outside train steps
  (evaluation, saving) is excluded with `restart_clock()`.
  """

  def __init__(self, writer, batch_size: int, total_steps: int, steps_per_epoch: float):
    self.writer, self.batch_size = writer, batch_size
    self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
    self.pending, self.step_times = [], []
    self.steps_since_log, self.t_log = 0, time.time()
    self.last_loss = float("nan")

  def add(self, metrics: dict):
    self.pending.append(metrics)
    self.steps_since_log += 1

  def restart_clock(self):
    self.t_log = time.time()

  def flush(self, step: int):
    if not self.pending:
      return None
    vals = jax.device_get(self.pending)
    fault = first_nonfinite(vals, step - len(vals) + 1)
    if fault:
      return fault
    for v in vals:
      v.pop("params_finite")
    step_time = (time.time() - self.t_log) / max(self.steps_since_log, 1)
    self.step_times.append(step_time)
    mean = {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}
    mean["lr"] = float(vals[-1]["lr"])
    mean.update(
        images_per_sec=self.batch_size / step_time,
        step_time=step_time,
        epoch=step / self.steps_per_epoch,
    )
    self.last_loss = mean["loss"]
    self.writer.write(step, "train", mean)
    eta = float(np.median(self.step_times[-20:])) * (self.total_steps - step)
    width = len(str(self.total_steps))
    log(
        f"step {step:>{width}}/{self.total_steps} ({100 * step / self.total_steps:3.0f}%) | "
        f"loss {mean['loss']:.4f} | lr {mean['lr']:.3e} | gnorm {mean['grad_norm']:.3f} | "
        f"{mean['images_per_sec']:.1f} img/s | {step_time:.3f} s/step | "
        f"ETA {fmt_duration(eta)}"
    )
    self.pending, self.steps_since_log = [], 0
    self.restart_clock()
    return None


class Saver:
  """Starts checkpoint saves with their meta, logs "saved" once a step is committed, and
  remembers the newest checkpoint this run or an earlier one saved (`last_saved`). Tells
  train.py's supervisor (strip_mlp/runtime/supervisor.py) the directory and each committed step."""

  def __init__(
      self, ckpt: Checkpointer, meta: dict, steps_per_epoch: float, last_saved: int | None
  ):
    self.ckpt, self.meta, self.steps_per_epoch = ckpt, meta, steps_per_epoch
    self.last_saved = last_saved
    supervisor.report(checkpoints=ckpt.directory, committed=last_saved)

  def save(self, step: int, state, best_top1: float, metrics: dict | None = None):
    meta = dict(self.meta, epoch=float(step / self.steps_per_epoch), best_top1=best_top1)
    if self.ckpt.save(step, state, meta, metrics):
      self.last_saved = step
      log(f"saving checkpoint {self.ckpt.directory}/{step}")

  def announce_committed(self, wait: bool = False):
    """Logs the steps orbax has committed since the last call; `wait` blocks for the save
    in flight first."""
    for step in (self.ckpt.wait() if wait else self.ckpt.newly_committed()):
      supervisor.report(committed=step)
      log(f"saved checkpoint {self.ckpt.directory}/{step}")

  def last_saved_path(self) -> str | None:
    return None if self.last_saved is None else f"{self.ckpt.directory}/{self.last_saved}"


class PreemptionWatcher:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a flag the loop polls (save, then stop); all
  processes agree before acting. A second signal goes to the previous handler (Ctrl-C
  twice: KeyboardInterrupt at once), except a second SIGTERM under train.py's supervisor:
  a scheduler that signals every process of a job reaches it directly and through the
  supervisor, and that is still one request."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._flag = False
    self._old = {}
    if threading.current_thread() is threading.main_thread():
      for s in signals:
        self._old[s] = signal.signal(s, self._handler)

  def _handler(self, signum, frame):
    previous = self._old.get(signum)
    if self._flag and signum == signal.SIGTERM and supervisor.is_child():
      return
    if self._flag and callable(previous):
      previous(signum, frame)
      return
    self._flag = True
    print(
        f"process {jax.process_index()}: received signal {signum}; saving a checkpoint "
        "and stopping at the end of this step",
        flush=True,
    )

  def should_stop(self, step: int, every: int) -> bool:
    """Collective in multi-process runs: called by every process at the same steps."""
    if jax.process_count() == 1:
      return self._flag
    if step % every:
      return False
    flags = multihost_utils.process_allgather(np.array([self._flag], np.int32))
    return bool(np.any(flags))

  def close(self):
    for s, h in self._old.items():
      signal.signal(s, h)


def save_config(config, plan, workdir: str, extra: dict):
  """Writes the resolved config (overrides applied, derived values included) to workdir,
  noting which keys differ from the config an earlier run saved there."""
  if jax.process_index() != 0:
    return
  resolved = json.loads(config.to_json_best_effort())
  resolved["model"]["num_classes"] = plan.num_classes
  resolved["model"]["img_size"] = plan.image_size
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f).get("config", {})
    new_flat = flax.traverse_util.flatten_dict(resolved, sep=".")
    old_flat = flax.traverse_util.flatten_dict(old, sep=".")
    changed = sorted(
        k for k in new_flat.keys() | old_flat.keys() if new_flat.get(k) != old_flat.get(k)
    )
    if changed:
      log(f"note: config differs from the one in {path}: {', '.join(changed[:8])}")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"config": resolved, "derived": {**plan.to_dict(), **extra}}, f, indent=2)
  os.replace(tmp, path)
