"""The machines a run can be planned for: the local one (devices and memory as JAX and the OS report them) and
named presets of TPU / GPU hosts (nominal memory; `--config.plan.hardware=NAME`)."""
from __future__ import annotations

import dataclasses
import os

import jax

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Hardware:
  """A machine: devices (accelerator chips as JAX sees them), memory per device and per host (nominal)."""
  description: str
  n_devices: int
  device_gib: float
  host_gib: float
  hosts: int = 1
  platform: str = "tpu"


HARDWARE = {
    "tpu_v5e_8": Hardware("TPU v5e-8 (v5litepod-8, one host)", 8, 16, 188, 1),
    "tpu_v5e_16": Hardware("TPU v5e-16 (4 hosts)", 16, 16, 47, 4),
    "tpu_v4_8": Hardware("TPU v4-8 (4 chips, one host)", 4, 32, 407, 1),
    "tpu_v4_32": Hardware("TPU v4-32 (16 chips, 4 hosts)", 16, 32, 407, 4),
    "tpu_v5p_8": Hardware("TPU v5p-8 (4 chips, one host)", 4, 95, 448, 1),
    "tpu_v6e_8": Hardware("TPU v6e-8 (one host)", 8, 32, 1440, 1),
    "colab_v5e_1": Hardware("Colab TPU v5e-1", 1, 16, 47, 1),
    "colab_v2_8": Hardware("Colab TPU v2-8 (8 cores)", 8, 8, 334, 1),
    "h100x1": Hardware("1x H100 80GB", 1, 80, 240, 1, "gpu"),
    "h100x8": Hardware("8x H100 80GB (one host)", 8, 80, 1800, 1, "gpu"),
    "a100x1": Hardware("1x A100 80GB", 1, 80, 200, 1, "gpu"),
    "a100x8": Hardware("8x A100 80GB (one host)", 8, 80, 1000, 1, "gpu"),
}


def local_hardware(override_device_gib=0.0, override_host_gib=0.0) -> tuple[str, Hardware]:
  """("local", Hardware) of this process's devices: count, memory (memory_stats bytes_limit; CPU: host RAM)."""
  devs = jax.devices()
  try:
    stats = devs[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 (backends without memory stats)
    stats = {}
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
  dev = stats.get("bytes_limit", 0) / GiB or host
  hw = Hardware(f"{len(devs)} x {devs[0].device_kind} ({devs[0].platform})", len(devs),
                override_device_gib or dev, override_host_gib or host, jax.process_count(), devs[0].platform)
  return "local", hw


def get_hardware(spec) -> tuple[str, Hardware]:
  """The hardware a RunSpec plans for: its `plan.hardware` preset (with overrides) or the local machine."""
  p = spec.plan
  if p.hardware:
    hw = HARDWARE[p.hardware]
    return p.hardware, dataclasses.replace(hw, device_gib=p.device_memory_gib or hw.device_gib,
                                           host_gib=p.host_memory_gib or hw.host_gib)
  return local_hardware(p.device_memory_gib, p.host_memory_gib)


class _MeshShape:
  """What sharding.logical_to_spec reads of a mesh (axis names and sizes), without devices."""
