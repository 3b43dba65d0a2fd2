"""metrics.jsonl and TensorBoard scalars (strip_mlp/train/metric_writer.py)."""

import json

import numpy as np
import tensorflow as tf

from strip_mlp.train.metric_writer import MetricWriter


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "kind": k, "loss": 1.0} for s in (1, 2, 3, 4) for k in ("train",)]
  rows.insert(2, {"step": 2, "kind": "eval", "top1": 0.5})
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  writer = MetricWriter(str(tmp_path), start_step=2)
  writer.write(3, "train", {"loss": 0.5})
  writer.close()
  got = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r["step"], r["kind"]) for r in got] == [
      (1, "train"),
      (2, "train"),
      (2, "eval"),
      (3, "train"),
  ]
  assert got[-1]["loss"] == 0.5
  assert "dropped 2 row(s) after step 2" in capsys.readouterr().out


def test_tensorboard_scalars_are_written(tmp_path):
  """With tensorboard=True each value becomes a scalar '<kind>/<name>' at its step, readable
  by TensorBoard's event reader (here: TensorFlow's)."""
  writer = MetricWriter(str(tmp_path), tensorboard=True)
  writer.write(1, "train", {"loss": 2.5, "lr": 1e-3})
  writer.write(2, "train", {"loss": 1.5, "lr": 2e-3})
  writer.write(2, "eval", {"top1": 0.75})
  writer.close()
  events = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1
  scalars = {}
  for record in tf.data.TFRecordDataset(str(events[0])):
    event = tf.compat.v1.Event.FromString(record.numpy())
    for v in event.summary.value:
      assert v.metadata.plugin_data.plugin_name == "scalars"
      scalars[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
  assert scalars == {
      ("train/loss", 1): 2.5,
      ("train/lr", 1): np.float32(1e-3),
      ("train/loss", 2): 1.5,
      ("train/lr", 2): np.float32(2e-3),
      ("eval/top1", 2): 0.75,
  }
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["kind"]) for r in rows] == [(1, "train"), (2, "train"), (2, "eval")]
