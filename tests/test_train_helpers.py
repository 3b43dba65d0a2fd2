"""The NaN guard: what is checked each step, what the error says, what is never saved;
metrics.jsonl after resumes."""

import contextlib
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_test_utils as utils  # noqa: E402

from strip_mlp.runtime import sharding  # noqa: E402
from strip_mlp.train import train_helpers, train_lib  # noqa: E402
from strip_mlp.train import steps as steps_lib  # noqa: E402
from strip_mlp.errors import TrainingDivergedError  # noqa: E402

BAD_LABEL = 9


def _metrics(loss=1.0, grad_norm=1.0, params_finite=1.0):
  return {
      "loss": np.float32(loss),
      "grad_norm": np.float32(grad_norm),
      "lr": 1e-3,
      "params_finite": np.float32(params_finite),
  }


def test_first_nonfinite_names_what_broke_first():
  vals = [_metrics(), _metrics(grad_norm=np.nan, params_finite=0.0), _metrics(np.nan)]
  step, bad, m = train_helpers.first_nonfinite(vals, first_step=11)
  assert (step, bad) == (12, ["gradients", "parameters"]) and m is vals[1]
  assert train_helpers.first_nonfinite([_metrics(), _metrics()], 1) is None
  assert train_helpers.first_nonfinite([_metrics(np.inf)], 5)[:2] == (5, ["loss"])


def test_divergence_message_tells_fault_from_divergence():
  fault = train_helpers.divergence_message(12, ["gradients"], _metrics(0.5), "/w/checkpoints/10")
  assert "step 12" in fault and "numerical fault" in fault and "lr" not in fault
  assert "/w/checkpoints/10, is finite" in fault and "\n" not in fault
  diverged = train_helpers.divergence_message(3, ["loss", "gradients"], _metrics(np.nan), None)
  assert "lower lr.base" in diverged and "no checkpoint was saved" in diverged
  assert "resumes from that checkpoint" not in diverged


def _loss_with_nan_gradient_on_bad_batches():
  """soft_cross_entropy whose value is exact but whose gradient is NaN for a batch whose
  labels are all BAD_LABEL: a backward-pass fault behind a finite loss."""
  exact = steps_lib.soft_cross_entropy

  @jax.custom_jvp
  def loss(logits, targets):
    return exact(logits, targets)

  @loss.defjvp
  def _jvp(primals, tangents):
    _, targets = primals
    value, tangent = jax.jvp(exact, primals, tangents)
    bad = jnp.all(jnp.argmax(targets, -1) == BAD_LABEL)
    return value, tangent * jnp.where(bad, jnp.nan, 1.0)  # linear: NaN reaches the VJP

  return loss


def _iterator_with_bad_batch_at(bad_step):
  def make(config, batch_size, batch_sharding, seed, start_step):
    inner = train_lib.default_train_iterator(config, batch_size, batch_sharding, seed, start_step)
    for step, batch in enumerate(inner, start=start_step + 1):
      if step == bad_step:
        labels = np.full(batch["label"].shape, BAD_LABEL, np.int32)
        batch = dict(batch, label=jax.device_put(labels, batch["label"].sharding))
      yield batch

  return make


def test_nan_gradients_behind_a_finite_loss_stop_without_saving(tmp_path, monkeypatch):
  monkeypatch.setattr(steps_lib, "soft_cross_entropy", _loss_with_nan_gradient_on_bad_batches())
  config = utils.small_config(
      **{
          **utils.MINI,
          "mesh.fsdp": 1,
          "data.mixup_alpha": 0.0,
          "data.cutmix_alpha": 0.0,
          "checkpoint_every_steps": 1,
      }
  )
  mesh = sharding.create_mesh(1, jax.devices()[:1])
  out = io.StringIO()
  with pytest.raises(TrainingDivergedError) as e:
    with contextlib.redirect_stdout(out):
      train_lib.train_and_evaluate(
          config, str(tmp_path), mesh=mesh, train_iterator_fn=_iterator_with_bad_batch_at(3)
      )
  log = out.getvalue()
  saving, saved = (
      log.index(f"{w} checkpoint {tmp_path}/checkpoints/2") for w in ("saving", "saved")
  )
  assert saving < saved and "checkpoints/3" not in log, log
  msg = str(e.value)
  assert "at step 3 the gradients and parameters became non-finite" in msg, msg
  assert "numerical fault" in msg and f"{tmp_path}/checkpoints/2, is finite" in msg, msg
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps == [1, 2], os.listdir(tmp_path / "checkpoints")
  rows = utils.read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2] and "params_finite" not in rows[0]


@pytest.mark.parametrize("supervised", [False, True])
def test_a_second_sigterm_escalates_unless_a_supervisor_forwarded_it(supervised, monkeypatch):
  """Under train.py's supervisor a scheduler's SIGTERM can arrive twice (directly and
  forwarded): still one request to save and stop, not a kill."""
  import signal  # pylint: disable=g-import-not-at-top

  from strip_mlp.runtime import supervisor  # pylint: disable=g-import-not-at-top

  if supervised:
    monkeypatch.setenv(supervisor.ENV_FD, f"-1:{os.getppid()}")
  previous_calls = []
  old = signal.signal(signal.SIGTERM, lambda *a: previous_calls.append(a[0]))
  watcher = train_helpers.PreemptionWatcher(signals=(signal.SIGTERM,))
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.should_stop(step=1, every=1)
  finally:
    watcher.close()
    signal.signal(signal.SIGTERM, old)
  assert previous_calls == ([] if supervised else [signal.SIGTERM])
