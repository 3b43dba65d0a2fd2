"""One process of the multi-process training test (tests/test_train_multiprocess.py).

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR STOP_AT

Joins a localhost jax.distributed cluster (CPU devices from XLA_FLAGS, gloo collectives),
trains tests/train_test_utils.small_config(**MINI) until STOP_AT (saving a shared
checkpoint there) and prints one line `RESULT {json}`.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import train_test_utils  # noqa: E402  (this script's directory is on sys.path)


def main():
  process_id, num_processes, port, workdir, stop_at = sys.argv[1:6]
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  train_test_utils.enable_compilation_cache()
  train_test_utils.quiet_logs()
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=int(num_processes),
      process_id=int(process_id),
      initialization_timeout=120,
  )
  from strip_mlp.train import train_lib  # pylint: disable=g-import-not-at-top

  config = train_test_utils.small_config(**train_test_utils.MINI)
  result = train_lib.train_and_evaluate(config, workdir, stop_at_step=int(stop_at))
  print(
      "RESULT "
      + json.dumps(
          {
              "step": result["step"],
              "stopped": result["stopped"],
              "process_count": jax.process_count(),
              "device_count": jax.device_count(),
              "train_loss": result["train_loss"],
          }
      ),
      flush=True,
  )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
