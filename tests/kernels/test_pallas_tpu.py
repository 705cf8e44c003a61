"""The Mosaic TPU kernels, run in Pallas interpret mode on CPU, equal x @ W^T (float64 NumPy reference).
QDLLM_KERNELS_COMPILED=1 runs them compiled instead (on a TPU: benchmarks/accel_check.sh)."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.kernels import pallas_tpu, qmatmul

INTERPRET = os.environ.get("QDLLM_KERNELS_COMPILED") != "1"
PATH = "pallas_tpu_interpret" if INTERPRET else "pallas_tpu"


def _x(batch, n_in, dtype, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(batch + (n_in,)), dtype)


@pytest.mark.parametrize("batch,tile_m", [((1,), None), ((8,), None), ((2, 37), 32)])
def test_planes_multistep_grid(planes, assert_matmul, batch, tile_m):
  """out 136 = one full + one partial 128-row tile, 10 planes in 2 steps of 5, several token tiles."""
  qw, w = planes(136, 640, [2, 2, 3, 1, 2])
  x = _x(batch, 640, jnp.float32)
  f = functools.partial(pallas_tpu.planes_matmul, interpret=INTERPRET, tile_out=128, planes_per_step=5, tile_m=tile_m)
  y = jax.jit(f)(x.reshape(-1, 640), qw)
  assert_matmul(y, x.reshape(-1, 640), w, bf16=False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_planes_dispatch(planes, assert_matmul, dtype):
  qw, w = planes(72, 256, [1, 3])
  x = _x((3,), 256, dtype)
  y = jax.jit(lambda x, q: qmatmul(x, q, path="interpret" if INTERPRET else PATH))(x, qw)
  assert y.dtype == dtype
  assert_matmul(y, x, w, bf16=dtype == jnp.bfloat16)


UNIFORM = [  # (out, in, bits, group, sym, act, max_kw): local / global expansion, 1 or several unit blocks
    (136, 640, 2, 32, False, False, 512),
    (72, 4096, 2, 128, False, False, 128),     # local, 2 unit blocks
    (72, 640, 4, 128, True, False, 512),
    (72, 1536, 3, 128, False, False, 512),     # 3-word units (48), local, one block
    (40, 8192, 3, 128, False, False, 128),     # 3-word units, local, 2 blocks of 128 units
    (40, 4800, 3, 100, False, False, 128),     # units straddle groups: global, ragged last block (150 units)
    (72, 4096, 2, 128, False, True, 512),      # act-order, global, 2 blocks
    (72, 640, 8, -1, False, False, 512),
    (40, 640, 6, 64, False, False, 512),       # 16 codes in 3 words
]


@pytest.mark.parametrize("out,n_in,bits,group,sym,act,max_kw", UNIFORM)
def test_uniform(uniform, assert_matmul, out, n_in, bits, group, sym, act, max_kw):
  qw, w = uniform(out, n_in, bits, group, sym=sym, act_order=act)
  x = _x((3,), n_in, jnp.float32)
  f = functools.partial(pallas_tpu.uniform_matmul, interpret=INTERPRET, tile_out=128, max_kw=max_kw)
  assert_matmul(jax.jit(f)(x, qw), x, w, bf16=False)


def test_uniform_prefill_bf16(uniform, assert_matmul):
  qw, w = uniform(136, 640, 4, 64)
  x = _x((2, 37), 640, jnp.bfloat16)
  y = jax.jit(lambda x, q: qmatmul(x, q, path=PATH))(x, qw)
  assert_matmul(y.reshape(-1, 136), x.reshape(-1, 640), w, bf16=True)
