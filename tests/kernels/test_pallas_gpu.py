"""The Triton GPU kernels, run in Pallas interpret mode on CPU, equal x @ W^T (float64 NumPy reference).
QDLLM_KERNELS_COMPILED=1 runs them compiled instead (on a GPU: benchmarks/accel_check.sh)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.kernels import qmatmul

PATH = "pallas_gpu" if os.environ.get("QDLLM_KERNELS_COMPILED") == "1" else "pallas_gpu_interpret"


def _run(x, qw):
  return jax.jit(lambda x, q: qmatmul(x, q, path=PATH))(x, qw)


@pytest.mark.parametrize("batch", [(1,), (2, 37)])
def test_planes(planes, assert_matmul, batch):
  """out 136 = 128 + a clamped partial tile; 74 tokens = 2 token tiles of 64."""
  qw, w = planes(136, 640, [2, 1, 3, 2, 3])
  x = jnp.asarray(np.random.default_rng(0).standard_normal(batch + (640,)), jnp.float32)
  assert_matmul(_run(x, qw).reshape(-1, 136), x.reshape(-1, 640), w, bf16=False)


def test_planes_bf16(planes, assert_matmul):
  qw, w = planes(72, 256, [3, 1])
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 256)), jnp.bfloat16)
  y = _run(x, qw)
  assert y.dtype == jnp.bfloat16
  assert_matmul(y, x, w, bf16=True)


@pytest.mark.parametrize("bits,group,sym,act", [(2, 32, False, False), (3, 128, False, False), (3, 80, False, False),
                                                (4, 64, True, False), (2, 64, False, True), (8, -1, False, False),
                                                (5, 64, False, False), (3, 64, False, True)])
def test_uniform(uniform, assert_matmul, bits, group, sym, act):
  qw, w = uniform(136, 640, bits, group, sym=sym, act_order=act)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 640)), jnp.float32)
  assert_matmul(_run(x, qw), x, w, bf16=False)


def test_uniform_ragged_prefill_bf16(uniform, assert_matmul):
  qw, w = uniform(72, 384, 3, 128)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 37, 384)), jnp.bfloat16)
  assert_matmul(_run(x, qw).reshape(-1, 72), x.reshape(-1, 384), w, bf16=True)
