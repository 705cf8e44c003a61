"""Random packed weights for the kernel tests, with float64 NumPy references built from the raw random data.

Weights are made with quant/packed.py's own constructors (`pack_signs` via `from_binary_planes`, `pack_codes` via
`from_uniform`) from random signs/codes/scales, so the tests depend neither on the solvers nor on the kernels.
The reference W^ is computed here in float64 straight from the unpacked random data (the scales are drawn as
float16-representable values, so storage rounding does not enter).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.quant import packed


def _f16(a):
  return np.asarray(a, np.float16).astype(np.float64)


def make_planes(rng, out, n_in, orders, bs=128):
  """(QuantizedWeight binary_planes, W^ float64 [out, in]): W^[:, b] = sum_{k < orders[b]} a_r a_c^T ⊙ (2B - 1)."""
  nb = n_in // bs
  assert len(orders) == nb
  signs = rng.random((nb, 3, out, bs)) < 0.5
  a_r = _f16(rng.uniform(0.02, 0.2, (nb, 3, out)))
  a_c = _f16(rng.uniform(0.3, 1.5, (nb, 3, bs)))
  w = np.zeros((out, n_in))
  for b in range(nb):
    for k in range(orders[b]):
      w[:, b * bs:(b + 1) * bs] += np.outer(a_r[b, k], a_c[b, k]) * np.where(signs[b, k], 1.0, -1.0)
  bits = packed.pack_signs(jnp.asarray(signs))
  qw = packed.from_binary_planes(bits, a_r.astype(np.float32), a_c.astype(np.float32), np.asarray(orders),
                                 shape=(out, n_in))
  return qw, w


def make_uniform(rng, out, n_in, bits, group, sym=False, act_order=False):
  """(QuantizedWeight uniform, W^ float64 [out, in]): W^[o, j] = s[o, g(j)] (q[o, j] - z[o, g(j)])."""
  g = n_in if group == -1 else group
  ng = n_in // g
  codes = rng.integers(0, 2 ** bits, (out, n_in))
  scales = _f16(rng.uniform(0.01, 0.1, (out, ng)))
  zeros = np.full((out, ng), 2 ** (bits - 1)) if sym else rng.integers(0, 2 ** bits, (out, ng))
  if act_order:
    perm = rng.permutation(n_in)
    gidx = np.empty(n_in, np.int64)
    gidx[perm] = np.arange(n_in) // g
  else:
    gidx = np.arange(n_in) // g
  w = scales[:, gidx] * (codes - zeros[:, gidx])
  qw = packed.from_uniform(codes, scales.astype(np.float32), None if sym else zeros, bits=bits,
                           group_size=group, sym=sym, g_idx=gidx.astype(np.int32) if act_order else None)
  return qw, w


def check(y, x, w, *, bf16: bool):
  """Assert y ≈ x @ w^T (float64 reference from the values x actually holds)."""
  x64 = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
  ref = x64 @ w.T
  y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
  assert y.shape == ref.shape, (y.shape, ref.shape)
  scale = np.abs(ref).max()
  err = np.abs(y - ref).max() / scale
  tol = 2e-2 if bf16 else 2e-6
  assert err <= tol, f"relative max error {err:.3g} > {tol}"


@pytest.fixture
def rng():
  return np.random.default_rng(1234)


@pytest.fixture
def planes(rng):
  """Factory fixture: planes(out, in, orders, bs=128) -> (qw, W^ float64)."""
  return lambda *a, **k: make_planes(rng, *a, **k)


@pytest.fixture
def uniform(rng):
  """Factory fixture: uniform(out, in, bits, group, sym=False, act_order=False) -> (qw, W^ float64)."""
  return lambda *a, **k: make_uniform(rng, *a, **k)


@pytest.fixture
def assert_matmul():
  """The `check` assertion as a fixture: assert_matmul(y, x, w, bf16=...)."""
  return check
