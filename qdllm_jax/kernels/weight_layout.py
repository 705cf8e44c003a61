"""Shared helpers of the packed-matmul paths: layout facts of a `QuantizedWeight` that every kernel needs.

Binary planes (docs/packed_format.md): P planes, plane p covers the bs-column block `plane_block[p]`, planes are
ordered by block then by order k. `block_slots` turns the flat plane list into a fixed [nb, 3] table (blocks have
1..3 planes) so a dequantizing path can loop over k = 0, 1, 2 with a validity mask instead of data-dependent shapes.

Uniform (quant/packed.py): a row is nu units of cu codes in wu words (2/4/8 bits: one word of 32 / bits codes;
3 bits: 32 codes in 3 words), words stored word-major (word k of all units is one contiguous [out, nu] slice).
Column j = u * cu + t is slot t of unit u; `packed.slot_code` extracts it with a shift and a mask (and an OR of
the next word for a code that crosses a word boundary). The kernels use the "t-major" column order (t, u): slot t
of every unit is one contiguous [out, nu] array, so no kernel ever interleaves lanes; the activations are
permuted to match once per call (`permute_x_tmajor`, O(tokens * in), cheap).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.quant import packed

MAX_ORDER = 3  # DAQ orders are 1..3 (Quant-dLLM, arXiv 2510.03274: the DAQ representation and ABMP)


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
  """Static layout numbers of a uniform weight (quant/packed.py: units of cu codes in wu words, word-major).

  Returns:
    dict with bits, cu (codes per unit), wu (words per unit), nu (units per row), nw = nu wu (words per row),
    n_in, n_pad = nu cu (columns incl. the zero codes of the last unit), G (columns per group), ng (groups),
    aligned (no act-order and every unit inside one group: G % cu == 0 or one group per row), upg (units per
    group when aligned: G / cu, or nu for one group).
  """
  out, n_in = qw.shape
  bits = int(qw.bits)
  cu, wu = packed.unit_shape(bits)
  nu = -(-n_in // cu)
  g = n_in if qw.group_size == -1 else int(qw.group_size)
  ng = n_in // g
  aligned = qw.g_idx is None and (ng == 1 or g % cu == 0)
  return dict(bits=bits, cu=cu, wu=wu, nu=nu, nw=nu * wu, n_in=n_in, n_pad=nu * cu, G=g, ng=ng, aligned=aligned,
              upg=(nu if ng == 1 else g // cu) if aligned else 0)


def column_groups(qw) -> jax.Array:
  """Group of every input column j: g_idx[j] (act-order) or j // G; int32 [in]."""
  geo = uniform_geometry(qw)
  if qw.g_idx is not None:
    return jnp.asarray(qw.g_idx, jnp.int32)
  return jnp.asarray(np.arange(geo["n_in"]) // geo["G"], jnp.int32)


def tmajor_groups(qw) -> jax.Array:
  """Group of the column in t-major slot (t, u), i.e. of column j = u * cu + t; int32 [cu, nu].

  Slots past the last column (j >= in, zero codes of the last unit) get group 0; the matching activations
  are zero (`permute_x_tmajor`), so they contribute nothing.
  """
  geo = uniform_geometry(qw)
  cu, nu, n_in = geo["cu"], geo["nu"], geo["n_in"]
  cols = np.arange(nu)[None, :] * cu + np.arange(cu)[:, None]
  gcol = column_groups(qw)
  return jnp.where(jnp.asarray(cols < n_in), gcol[jnp.asarray(np.minimum(cols, n_in - 1))], 0)


def permute_x_tmajor(x2: jax.Array, cu: int, nu: int) -> jax.Array:
  """xp[n, t, u] = x[n, u * cu + t] (zero past the last column); x2 [n, in] -> [n, cu, nu] (x2's dtype)."""
  n, n_in = x2.shape
  pad = nu * cu - n_in
  xp = jnp.pad(x2, ((0, 0), (0, pad))) if pad else x2
  return xp.reshape(n, nu, cu).transpose(0, 2, 1)


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
