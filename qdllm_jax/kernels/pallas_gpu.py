"""Pallas GPU (Triton backend) kernels: y = x @ W^T straight from the packed words.

Grid (M tiles, out tiles); each program keeps a float32 [tm, to] accumulator in registers and loops over the
reduction (planes, or K chunks) with `lax.fori_loop`. The packed arrays are passed whole (no BlockSpec blocking)
and read with gather indexing on the refs, which Triton lowers to pointer arithmetic:
  binary_planes, plane p (block b = plane_block[p]):
    words[o, j] = planes[p, o, j // 32],  Bpm[o, j] = +1 if (words >> j % 32) & 1 else -1,
    acc += a_r[p, o] * ((x[:, b bs + j] a_c[p, j]) @ Bpm^T)
  uniform, K chunk of kc columns j (natural column order, any bits / groups / act-order; quant/packed.py units):
    code[o, j] = bits [b t, b t + b) of unit u = j // cu (t = j % cu): (word_k >> sh | word_{k+1} << (32 - sh))
    & mask with k, sh = divmod(b t, 32), the second word only for a code crossing a word boundary; word k of unit
    u is q[o, k nu + u] (word-major). W[o, j] = s[o, g(j)] (code - z[o, g(j)]), acc += x[:, chunk] @ W^T,
    g = column groups (g_idx or j // G).
Out-of-range rows of the last out tile are clamped to row out-1 for the reads and land in padding columns of
the (padded) output, which the wrapper slices off; the token dimension is zero-padded to the tile. Every loaded
tensor has power-of-two dims (Triton): tm >= 16, to in {16..128}, bs and kc powers of two.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from qdllm_jax.kernels import weight_layout

_HI = jax.lax.Precision.HIGHEST


def _pow2_at_least(n: int, lo: int) -> int:
  p = lo
  while p < n:
    p *= 2
  return p


def _tiles(n: int, out: int):
  """(tm, to): token tile (power of two, 16..64) and output tile (power of two, 16..128)."""
  tm = min(_pow2_at_least(n, 16), 64)
  to = min(_pow2_at_least(out, 16), 128)
  return tm, to


def _dot_t(a, b):
  """a [m, k] @ b[n, k]^T, float32 accumulation (exact float32 products for float32 inputs)."""
  prec = _HI if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec,
                             preferred_element_type=jnp.float32)


def _planes_kernel(pb_ref, x_ref, w_ref, ar_ref, ac_ref, o_ref, *, num_planes, out, bs, tm, to, cdt):
  """One (M tile, out tile) program; loops over all planes (see module doc)."""
  m0 = pl.program_id(0) * tm
  rows = jnp.minimum(pl.program_id(1) * to + jnp.arange(to), out - 1)
  j = jnp.arange(bs)
  word_of = (j // 32)[None, :]
  bit_of = (j % 32).astype(jnp.uint32)[None, :]

  def body(p, acc):
    start = pb_ref[p] * bs
    words = w_ref[p, rows[:, None], word_of]                                # [to, bs] uint32
    sgn = jnp.where(((words >> bit_of) & 1) == 1, 1.0, -1.0).astype(cdt)
    xs = x_ref[pl.ds(m0, tm), pl.ds(start, bs)].astype(jnp.float32)
    z = (xs * ac_ref[p, :].astype(jnp.float32)[None, :]).astype(cdt)
    return acc + _dot_t(z, sgn) * ar_ref[p, rows].astype(jnp.float32)[None, :]

  acc = jax.lax.fori_loop(0, num_planes, body, jnp.zeros((tm, to), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def planes_matmul(x2: jax.Array, qw, *, interpret=False, num_warps: int = 4) -> jax.Array:
  """binary_planes y = x2 @ W^T on GPU (Triton). x2 [n, in] f32/bf16 -> float32 [n, out]."""
  n, n_in = x2.shape
  out = qw.shape[0]
  bs = qw.group_size
  tm, to = _tiles(n, out)
  mp, op = weight_layout.round_up(n, tm), weight_layout.round_up(out, to)
  xp = jnp.pad(x2, ((0, mp - n), (0, 0))) if mp != n else x2
  kernel = functools.partial(_planes_kernel, num_planes=qw.num_planes, out=out, bs=bs, tm=tm, to=to,
                             cdt=x2.dtype)
  y = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((mp, op), jnp.float32), grid=(mp // tm, op // to),
      out_specs=pl.BlockSpec((tm, to), lambda m, o: (m, o)), interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
      name="qdllm_planes_matmul_gpu")(qw.plane_block, xp, qw.planes, qw.a_r, qw.a_c)
  return y[:n, :out]


def _uniform_kernel(x_ref, q_ref, s_ref, z_ref, g_ref, o_ref, *, bits, cu, nu, n_in, nk, kc, out, tm, to,
                    sym, cdt):
  """One (M tile, out tile) program; loops over K chunks of kc columns (see module doc)."""
  m0 = pl.program_id(0) * tm
  rows = jnp.minimum(pl.program_id(1) * to + jnp.arange(to), out - 1)[:, None]
  mask = jnp.uint32(2 ** bits - 1)

  def body(k, acc):
    cols = jnp.minimum(k * kc + jnp.arange(kc), n_in - 1)
    off = (cols % cu) * bits                                                # bit offset in the unit
    word, sh = off // 32, (off % 32).astype(jnp.uint32)
    lo = q_ref[rows, (word * nu + cols // cu)[None, :]] >> sh[None, :]      # [to, kc] uint32 (word-major)
    if 32 % bits:  # some codes continue in the next word (one-word units never do: no second read)
      cross = (off % 32 + bits > 32)[None, :]
      hi = q_ref[rows, (jnp.where(cross[0], word + 1, word) * nu + cols // cu)[None, :]]
      lo = lo | jnp.where(cross, hi << ((jnp.uint32(32) - sh) % jnp.uint32(32))[None, :], jnp.uint32(0))
    code = (lo & mask).astype(jnp.float32)
    grp = g_ref[cols][None, :]
    s = s_ref[rows, grp].astype(jnp.float32)
    z = jnp.float32(2 ** (bits - 1)) if sym else z_ref[rows, grp].astype(jnp.float32)
    w = (s * (code - z)).astype(cdt)
    xs = x_ref[pl.ds(m0, tm), pl.ds(k * kc, kc)]                            # zero past column n_in
    return acc + _dot_t(xs, w)

  acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((tm, to), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def uniform_matmul(x2: jax.Array, qw, *, interpret=False, num_warps: int = 4, kc: int = 64) -> jax.Array:
  """uniform y = x2 @ W^T on GPU (Triton). x2 [n, in] f32/bf16 -> float32 [n, out]."""
  n, n_in = x2.shape
  out = qw.shape[0]
  geo = weight_layout.uniform_geometry(qw)
  tm, to = _tiles(n, out)
  mp, op = weight_layout.round_up(n, tm), weight_layout.round_up(out, to)
  nk = -(-n_in // kc)
  xp = jnp.pad(x2, ((0, mp - n), (0, nk * kc - n_in)))
  sym = bool(qw.sym)
  zeros = qw.scales if sym else qw.zeros                                    # placeholder when sym (unread)
  kernel = functools.partial(_uniform_kernel, bits=geo["bits"], cu=geo["cu"], nu=geo["nu"], n_in=n_in, nk=nk,
                             kc=kc, out=out, tm=tm, to=to, sym=sym, cdt=x2.dtype)
  y = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((mp, op), jnp.float32), grid=(mp // tm, op // to),
      out_specs=pl.BlockSpec((tm, to), lambda m, o: (m, o)), interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
      name="qdllm_uniform_matmul_gpu")(xp, qw.qweight, qw.scales, zeros, weight_layout.column_groups(qw))
  return y[:n, :out]


def matmul(x2: jax.Array, qw, *, interpret=False) -> jax.Array:
  """y = x2 @ W^T with the GPU kernel of qw's format; float32 [n, out]."""
  if qw.format == "binary_planes":
    return planes_matmul(x2, qw, interpret=interpret)
  return uniform_matmul(x2, qw, interpret=interpret)
