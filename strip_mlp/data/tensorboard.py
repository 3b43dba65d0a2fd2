"""TensorBoard scalars through tf.summary (TensorFlow is imported in strip_mlp/data only).

Written with the scalars plugin's metadata, which is what tf.summary.scalar writes, without
needing the tensorboard package installed.
"""

import os

import tensorflow as tf


class ScalarWriter:
  """Scalars '<kind>/<name>' at a step into WORKDIR/tensorboard/events.out.tfevents.*."""

  def __init__(self, workdir: str):
    self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    self._meta = tf.compat.v1.SummaryMetadata(
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars")
    )

  def write(self, step: int, kind: str, values: dict):
    with self._writer.as_default():
      for k, v in values.items():
        tf.summary.write(
            f"{kind}/{k}", tf.constant(v, tf.float32), step=int(step), metadata=self._meta
        )
    self._writer.flush()

  def close(self):
    self._writer.close()
