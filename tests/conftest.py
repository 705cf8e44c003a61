"""Test setup: offline hub access and 8 simulated CPU devices (set before jax is imported)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drop JAX's compilation caches after every test module. XLA:CPU maps each compiled program's code into memory
  regions of its own; the whole fast suite in one process compiled enough programs to pass Linux's default
  vm.max_map_count (65530 mappings), after which the next compile's mmap failed and XLA segfaulted (measured:
  41k mappings at 83 % of the first half of the suite). Cleared caches free the programs no live object holds."""
  yield
  jax.clear_caches()
