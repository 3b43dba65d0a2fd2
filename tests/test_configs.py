"""Every training config in configs/ loads without TensorFlow and has configs/default.py's keys.

Loading a config (train.py/eval.py's --config, before any flag is checked) must stay cheap:
it imports strip_mlp and strip_mlp.data.config only, never TensorFlow or TFDS. All config files
build on configs/common.base_config(), so all have the same (flattened) key set.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    f[:-3]
    for f in os.listdir(os.path.join(REPO, "configs"))
    if f.endswith(".py") and f not in ("__init__.py", "common.py")
)

# Runs in a fresh interpreter: prints {config name: sorted flattened keys} as JSON.
LOAD_ALL = """
import importlib, json, sys
import strip_mlp
assert "tensorflow" not in sys.modules, "import strip_mlp imported tensorflow"

def keys(c, prefix=""):
  out = []
  for k, v in c.items():
    out += keys(v, f"{prefix}{k}.") if hasattr(v, "items") else [prefix + k]
  return out

loaded = {name: sorted(keys(importlib.import_module("configs." + name).get_config()))
          for name in sys.argv[1:]}
for module in ("tensorflow", "tensorflow_datasets"):
  assert module not in sys.modules, f"loading the configs imported {module}"
print(json.dumps(loaded))
"""


def test_configs_load_without_tensorflow_and_share_default_keys():
  assert len(CONFIGS) >= 8 and "default" in CONFIGS
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-c", LOAD_ALL, *CONFIGS],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = json.loads(proc.stdout.strip().splitlines()[-1])
  assert sorted(loaded) == CONFIGS
  default = set(loaded["default"])
  assert {"data.source", "data.image_size", "model.variant", "lr.base"} <= default
  for name, keys in loaded.items():
    assert set(keys) == default, (name, set(keys) ^ default)
