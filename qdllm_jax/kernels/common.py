"""Shared helpers of the packed-matmul paths: layout facts of a `QuantizedWeight` that every kernel needs.

Binary planes (docs/packed_format.md): P planes, plane p covers the bs-column block `plane_block[p]`, planes are
ordered by block then by order k. `block_slots` turns the flat plane list into a fixed [nb, 3] table (blocks have
1..3 planes) so a dequantizing path can loop over k = 0, 1, 2 with a validity mask instead of data-dependent shapes.

Uniform: codes of `bits` bits packed `cpw = 32 // bits` per uint32 word along the input dimension, column
j = w * cpw + t at bit offset bits * t of word w. The kernels use the "t-major" column order (t, w): slot t of
every word is one contiguous [out, nw] array obtained by a shift, so no kernel ever interleaves lanes; the
activations are permuted to match once per call (`permute_x_tmajor`, O(tokens * in), cheap).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MAX_ORDER = 3  # DAQ orders are 1..3 (quant-dllm.md §3.1, §5)


def block_slots(orders: jax.Array, num_planes: int):
  """Plane index of slot k of every block and whether it exists.

  idx[b, k] = start_b + min(k, orders[b] - 1), valid[b, k] = k < orders[b], start_b = sum_{b' < b} orders[b'].
  Args:
    orders: int [nb] (1..3). num_planes: P (static).
  Returns:
    (idx int32 [nb, 3] in [0, P), valid bool [nb, 3]).
  """
  o = jnp.asarray(orders, jnp.int32)
  start = jnp.cumsum(o) - o
  k = jnp.arange(MAX_ORDER, dtype=jnp.int32)
  valid = k[None, :] < o[:, None]
  idx = start[:, None] + jnp.minimum(k[None, :], o[:, None] - 1)
  return jnp.clip(idx, 0, num_planes - 1), valid


def uniform_geometry(qw):
  """Static layout numbers of a uniform weight.

  Returns:
    dict with bits, cpw (codes per word), nw (words per row), n_in, G (columns per group), ng (groups),
    aligned (no act-order and every group is a whole number of words, so a word never straddles groups).
  """
  out, n_in = qw.shape
  bits = int(qw.bits)
  cpw = 32 // bits
  nw = -(-n_in // cpw)
  g = n_in if qw.group_size == -1 else int(qw.group_size)
  aligned = qw.g_idx is None and g % cpw == 0 and n_in % cpw == 0
  return dict(bits=bits, cpw=cpw, nw=nw, n_in=n_in, G=g, ng=n_in // g, aligned=aligned)


def column_groups(qw) -> jax.Array:
  """Group of every input column j: g_idx[j] (act-order) or j // G; int32 [in]."""
  geo = uniform_geometry(qw)
  if qw.g_idx is not None:
    return jnp.asarray(qw.g_idx, jnp.int32)
  return jnp.asarray(np.arange(geo["n_in"]) // geo["G"], jnp.int32)


def tmajor_groups(qw) -> jax.Array:
  """Group of the column in t-major slot (t, w), i.e. of column j = w * cpw + t; int32 [cpw, nw].

  Slots past the last column (j >= in, padding bits of the last word) get group 0; the matching activations
  are zero (`permute_x_tmajor`), so they contribute nothing.
  """
  geo = uniform_geometry(qw)
  cpw, nw, n_in = geo["cpw"], geo["nw"], geo["n_in"]
  cols = np.arange(nw)[None, :] * cpw + np.arange(cpw)[:, None]
  gcol = column_groups(qw)
  return jnp.where(jnp.asarray(cols < n_in), gcol[jnp.asarray(np.minimum(cols, n_in - 1))], 0)


def permute_x_tmajor(x2: jax.Array, cpw: int, nw: int) -> jax.Array:
  """xp[n, t, w] = x[n, w * cpw + t] (zero past the last column); x2 [n, in] -> [n, cpw, nw] (x2's dtype)."""
  n, n_in = x2.shape
  pad = nw * cpw - n_in
  xp = jnp.pad(x2, ((0, 0), (0, pad))) if pad else x2
  return xp.reshape(n, nw, cpw).transpose(0, 2, 1)


def zero_points(qw) -> jax.Array:
  """Zero point per (out, group) as float32 [out, ng]: stored zeros, or 2^(bits-1) when sym."""
  out = qw.shape[0]
  geo = uniform_geometry(qw)
  if qw.sym:
    return jnp.full((out, geo["ng"]), 2.0 ** (geo["bits"] - 1), jnp.float32)
  return qw.zeros.astype(jnp.float32)


def divisor_at_most(n: int, target: int) -> int:
  """Largest divisor of n that is <= target (>= 1)."""
  for d in range(min(n, target), 0, -1):
    if n % d == 0:
      return d
  return 1


def round_up(n: int, m: int) -> int:
  """Smallest multiple of m that is >= n."""
  return -(-n // m) * m
