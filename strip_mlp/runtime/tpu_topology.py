"""Abstract TPU devices for a named topology, and the published figures of each chip.

`devices("v5e:4x4")` returns the 16 devices of a v5e 4x4 slice (4 hosts) as the TPU compiler
sees them, on any machine where libtpu is installed (`pip install "strip-mlp-jax[tpu]"`),
without a TPU: `jax.jit(f).lower(...).compile()` over a Mesh of them gives the real TPU
executable (strip_mlp/train/compile_for.py). `chip_of(devices)` gives the chip's HBM, peak
bf16 compute and HBM bandwidth, from Google's Cloud TPU system-architecture pages;
`usable_hbm_bytes(devices)` what the compiler lets one program use (asked of it).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile

from strip_mlp.errors import UserError


class TopologyError(UserError, ValueError):
  """A topology name the TPU compiler does not know, or libtpu absent."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-device figures. A v2/v3 chip is two devices (TensorCores): these are per device."""

  generation: str
  hbm_bytes: int
  peak_flops: float  # bf16 matmul FLOP/s
  hbm_bytes_per_s: float
  source: str


_GIB = 2**30  # the pages' "GB" of HBM are GiB: the compiler allows v5e 15.75 GiB of 16
_DOCS = "https://cloud.google.com/tpu/docs/"
# device_kind (as libtpu names it) -> the chip's figures, per device.
CHIPS = {
    "TPU v2": Chip("v2", 8 * _GIB, 22.5e12, 300e9, _DOCS + "v2"),
    "TPU v3": Chip("v3", 16 * _GIB, 61.5e12, 450e9, _DOCS + "v3"),
    "TPU v4": Chip("v4", 32 * _GIB, 275e12, 1228e9, _DOCS + "v4"),
    "TPU v5 lite": Chip("v5e", 16 * _GIB, 197e12, 819e9, _DOCS + "v5e"),
    "TPU v5": Chip("v5p", 95 * _GIB, 459e12, 2765e9, _DOCS + "v5p"),
    "TPU v6 lite": Chip("v6e", 32 * _GIB, 918e12, 1640e9, _DOCS + "v6e"),
}
EXAMPLES = "v5e:2x2, v5e:4x4, v5e:16x16, v4:2x2x2, v5p:2x2x4, v6e:4x4"
_NAME = re.compile(r"^v(2|3|4|5e|5p|6e):\d+x\d+(x\d+)?$")


def _libtpu_missing() -> bool:
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return True
  return False


def devices(name: str) -> list:
  """The abstract devices of TPU topology `name` (e.g. 'v5p:4x4x4'), ordered by id.

  Raises TopologyError (one line) when libtpu is absent or the name is not a topology.
  libtpu's start-up notices on stderr (it looks for a TPU host) are dropped; on failure
  their first error line goes into the message.
  """
  if not _NAME.match(name or ""):
    raise TopologyError(
        f"--compile_for={name!r} is not a TPU topology; give <generation>:<chips per "
        f"dimension>, e.g. {EXAMPLES}"
    )
  if _libtpu_missing():
    raise TopologyError(
        "compiling for a TPU needs the TPU compiler: pip install 'strip-mlp-jax[tpu]' "
        "(libtpu, from the package registry; no TPU needed)"
    )
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  # Only the compiler is used: another process holding libtpu's lock (a training run on a
  # TPU host, a second compile) must not stop this one.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  with _stderr_captured() as captured:
    try:
      topology = topologies.get_topology_desc(platform="tpu", topology_name=name)
      error = None
    except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError and friends)
      error = e
  if error is not None:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    raise TopologyError(
        f"the TPU compiler does not know topology {name!r} ({first or captured()[:200]}); "
        f"try e.g. {EXAMPLES}"
    )
  return sorted(topology.devices, key=lambda d: d.id)


_AVAILABLE = re.compile(r"exceeds available HBM \(([0-9.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_usable: dict = {}


def parse_bytes(number: str, unit: str) -> int:
  """'15.75', 'G' (the TPU compiler's figures, binary units) -> bytes."""
  return int(float(number) * _UNITS[unit])


def usable_hbm_bytes(devs) -> int:
  """The HBM a program may use on one of `devs`, as the TPU compiler counts it (its
  reservations deducted: v5e 15.75 GiB of 16), found by compiling a program that needs
  more than any chip has and reading the limit from the refusal. Falls back to the
  published figure (`chip_of(devs).hbm_bytes`) when the refusal says no number."""
  kind = devs[0].device_kind
  if kind not in _usable:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    n = 2**17  # three (n, n) float32 temporaries: 192 GiB

    def too_big(x):
      a = jnp.cumsum(jnp.broadcast_to(x, (n, n)) * jnp.arange(n, dtype=jnp.float32), axis=0)
      return jnp.sum(a * jnp.cumsum(a[::-1], axis=1))

    arg = jax.ShapeDtypeStruct((), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(devs[0]))
    found = None
    try:
      jax.jit(too_big).lower(arg).compile()
    except Exception as e:  # pylint: disable=broad-except  (the refusal is what we want)
      found = _AVAILABLE.search(str(e))
    _usable[kind] = parse_bytes(*found.groups()) if found else chip_of(devs).hbm_bytes
  return _usable[kind]


def chip_of(devs) -> Chip:
  kind = devs[0].device_kind
  if kind not in CHIPS:
    raise TopologyError(f"no HBM figure for TPU device kind {kind!r}; known: {sorted(CHIPS)}")
  return CHIPS[kind]


class _stderr_captured:  # pylint: disable=invalid-name
  """Redirects file descriptor 2 (C++ logging included) to a temporary file; the
  context value returns what was written."""

  def __enter__(self):
    self._file = tempfile.TemporaryFile()
    self._saved = os.dup(2)
    os.dup2(self._file.fileno(), 2)
    return self._read

  def _read(self) -> str:
    self._file.seek(0)
    return self._file.read().decode(errors="replace")

  def __exit__(self, *exc):
    os.dup2(self._saved, 2)
    os.close(self._saved)
    return False
