"""Pallas/Mosaic TPU kernels: y = x @ W^T straight from the packed words (W^ exists only as VMEM tiles).

Block shapes follow the TPU (8, 128) tiling: every block's last two dims are multiples of (8, 128) or the full
array dims; partial edge blocks along `out` are padded by Pallas and their extra rows are never written back.
Accumulation is float32 in a VMEM scratch; the reduction grid axis is last ("arbitrary").

binary_planes: grid (M tiles, out tiles, plane groups). The kernel needs the words with `out` on lanes, so the
  wrapper swaps the packed array [P, out, W] to [P, W, out] (one pass over the packed bits: W = bs/32 words per
  row would otherwise fill 4 of 128 lanes). The token block holds all `in` columns (fetched once per M tile);
  plane p reads its block's columns with a 128-aligned dynamic lane slice at plane_block[p] (scalar prefetch):
    s = (x[:, blk] ⊙ a_c[p]) @ Bpm_p^T,  Bpm_p^T[32 w + i, o] = +1 if bit i of word w of row o else -1,
    acc += a_r[p] ⊙ s.
uniform: grid (M tiles, out tiles, K unit-blocks) in the t-major column order (weight_layout.py): the packed row is
  viewed as [wu, nu] (word k of every unit, word-major storage, a free reshape) and blocked [to, wu, ku]; slot t of a
  unit block is `packed.slot_code` of its wu word tiles, an [out, ku] tile; x is permuted to [cu, M, nu] by the wrapper.
  Per-group scale/zero are expanded to the unit lanes with an exact 0/1 matmul, s_u = s @ E (E[g, u] = 1 iff slot
  (t, u) belongs to group g), then W_t = s_u (code_t - z_u) and acc += x_t @ W_t^T.
  "local" E (no act-order, unit blocks made of whole groups) is one [gk, ku] matrix for
  every block and slot; otherwise ("global") E is [cu, ng, nuK] built per call from the column groups.
The wrappers hand the kernels float32 copies of the float16 scales and uint8 zero points (float16 / int8 vector
math is not native on every TPU generation); that is 2-4 bytes per 128 weights per plane or group.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qdllm_jax.kernels import weight_layout
from qdllm_jax.quant import packed

_VMEM_X_BYTES = 4 << 20      # budget of one token block (all `in` columns)
_HI = jax.lax.Precision.HIGHEST


def _tile_m(n: int, n_in: int, dtype) -> int:
  """Token tile: the padded batch for decode, else 256/128/... bounded by the VMEM budget of [tm, in]."""
  sub = 8 if jnp.dtype(dtype).itemsize == 4 else 16
  if n <= 256:
    tm = weight_layout.round_up(n, sub)
  else:
    tm = 256
  while tm > sub and tm * n_in * jnp.dtype(dtype).itemsize > _VMEM_X_BYTES:
    tm //= 2
  return max(weight_layout.round_up(tm, sub), sub)


def _tile_out(out: int, target: int) -> int:
  """Output tile: the full `out` when small, else a multiple of 128 (partial last tile allowed)."""
  return out if out <= target else target


def _dot(a, b, contract_b: int):
  """a [m, k] with b contracted on axis `contract_b` (0: b [k, n]; 1: b [n, k]); float32 result."""
  prec = _HI if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=prec,
                             preferred_element_type=jnp.float32)


def _planes_kernel(pb_ref, x_ref, w_ref, ar_ref, ac_ref, o_ref, acc_ref, *, pp, bs, cdt):
  """One (M tile, out tile, plane group) step; see the module doc for the math."""
  g = pl.program_id(2)

  @pl.when(g == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  nwords = bs // 32
  to = w_ref.shape[2]
  shift = jax.lax.broadcasted_iota(jnp.uint32, (32, to), 0)
  acc = acc_ref[...]
  for j in range(pp):
    blk = pb_ref[g * pp + j]
    start = pl.multiple_of(blk * bs, bs)
    z = (x_ref[:, pl.ds(start, bs)].astype(jnp.float32) * ac_ref[j]).astype(cdt)
    words = w_ref[j]                                                        # [W, to] uint32
    pieces = [(jnp.broadcast_to(words[w:w + 1, :], (32, to)) >> shift) & 1 for w in range(nwords)]
    bits = pieces[0] if nwords == 1 else jnp.concatenate(pieces, axis=0)    # [bs, to]
    sgn = jnp.where(bits == 1, 1.0, -1.0).astype(cdt)
    acc = acc + _dot(z, sgn, 0) * ar_ref[j]
  acc_ref[...] = acc

  @pl.when(g == pl.num_programs(2) - 1)
  def _out():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def planes_matmul(x2: jax.Array, qw, *, interpret=False, tile_out: int = 1024,
                  planes_per_step: int = 16, tile_m: int | None = None) -> jax.Array:
  """binary_planes y = x2 @ W^T on TPU. x2 [n, in] f32/bf16 -> float32 [n, out].

  tile_out: out rows per step (multiple of 128); planes_per_step: planes per step (a divisor of P is used);
  tile_m: token rows per step (multiple of 8/16; default by batch size and VMEM budget).
  """
  n, n_in = x2.shape
  out = qw.shape[0]
  bs = qw.group_size
  p = qw.num_planes
  nwords = bs // 32
  cdt = x2.dtype
  pp = weight_layout.divisor_at_most(p, planes_per_step)
  tm = tile_m or _tile_m(n, n_in, cdt)
  to = _tile_out(out, tile_out)
  mp = weight_layout.round_up(n, tm)
  xp = jnp.pad(x2, ((0, mp - n), (0, 0))) if mp != n else x2
  words = jnp.swapaxes(qw.planes, 1, 2)                                     # [P, W, out]
  a_r = qw.a_r.astype(jnp.float32).reshape(p, 1, out)                      # float16 math is not native on TPU
  a_c = qw.a_c.astype(jnp.float32).reshape(p, 1, bs)
  grid = (mp // tm, pl.cdiv(out, to), p // pp)
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=grid,
      in_specs=[pl.BlockSpec((tm, n_in), lambda m, o, g, pb: (m, 0)),
                pl.BlockSpec((pp, nwords, to), lambda m, o, g, pb: (g, 0, o)),
                pl.BlockSpec((pp, 1, to), lambda m, o, g, pb: (g, 0, o)),
                pl.BlockSpec((pp, 1, bs), lambda m, o, g, pb: (g, 0, 0))],
      out_specs=pl.BlockSpec((tm, to), lambda m, o, g, pb: (m, o)),
      scratch_shapes=[pltpu.VMEM((tm, to), jnp.float32)])
  kernel = functools.partial(_planes_kernel, pp=pp, bs=bs, cdt=cdt)
  y = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((mp, out), jnp.float32), grid_spec=spec, interpret=interpret,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      name="qdllm_planes_matmul")(qw.plane_block, xp, words, a_r, a_c)
  return y[:n]


def _uniform_kernel(x_ref, q_ref, s_ref, z_ref, e_ref, o_ref, acc_ref, *, bits, cu, wu, local, sym, cdt):
  """One (M tile, out tile, unit block) step; see the module doc for the math."""
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  qk = [q_ref[:, w, :] for w in range(wu)]                                  # wu x [to, ku] uint32
  s = s_ref[...]                                                            # [to, gk] float32
  z = None if sym else z_ref[...]
  half = jnp.float32(2 ** (bits - 1))

  def expand(e):
    e = e.astype(jnp.float32)
    sw = _dot(s, e, 0)
    return sw, (half if sym else _dot(z, e, 0))

  if local:
    sw, zw = expand(e_ref[...])
  acc = acc_ref[...]
  for t in range(cu):
    if not local:
      sw, zw = expand(e_ref[t])
    code = packed.slot_code(qk, t, bits).astype(jnp.float32)
    w_t = (sw * (code - zw)).astype(cdt)
    acc = acc + _dot(x_ref[t], w_t, 1)
  acc_ref[...] = acc

  @pl.when(k == pl.num_programs(2) - 1)
  def _out():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _uniform_plan(qw, max_ku: int):
  """Unit-block size ku, blocks nK, and whether the "local" expansion applies (see module doc)."""
  geo = weight_layout.uniform_geometry(qw)
  nu = geo["nu"]
  if geo["aligned"]:
    for ku in (512, 256, 128):
      if ku <= max_ku and nu % ku == 0 and ku % geo["upg"] == 0:
        return ku, nu // ku, True
    return nu, 1, True                                                      # one block = all groups
  ku = nu if nu <= 128 else 128
  return ku, pl.cdiv(nu, ku), False


def uniform_matmul(x2: jax.Array, qw, *, interpret=False, tile_out: int = 512, max_kw: int = 512,
                   tile_m: int | None = None) -> jax.Array:
  """uniform y = x2 @ W^T on TPU. x2 [n, in] f32/bf16 -> float32 [n, out].

  tile_out: out rows per step (multiple of 128); max_kw: largest unit block (512, 256 or 128) tried;
  tile_m: token rows per step (multiple of 8/16; default by batch size and VMEM budget).
  """
  n, n_in = x2.shape
  out = qw.shape[0]
  geo = weight_layout.uniform_geometry(qw)
  bits, cu, wu, nu, ng = geo["bits"], geo["cu"], geo["wu"], geo["nu"], geo["ng"]
  cdt = x2.dtype
  ku, nk, local = _uniform_plan(qw, max_kw)
  nuk = nk * ku
  tm = tile_m or _tile_m(n, ku * cu, cdt)
  to = _tile_out(out, tile_out)
  mp = weight_layout.round_up(n, tm)
  xp = weight_layout.permute_x_tmajor(x2, cu, nu)                                  # [n, cu, nu]
  xp = jnp.pad(xp, ((0, mp - n), (0, 0), (0, nuk - nu))).transpose(1, 0, 2)  # [cu, mp, nuk]
  q3 = qw.qweight.reshape(out, wu, nu)                                      # word-major units (free reshape)
  if local:
    gk = ng // nk
    e = np.zeros((gk, ku), np.float32)
    e[np.arange(ku) // geo["upg"], np.arange(ku)] = 1.0                     # unit u of the block -> group
    e = jnp.asarray(e, jnp.bfloat16)
    e_spec = pl.BlockSpec((gk, ku), lambda m, o, k: (0, 0))
    sz_spec = pl.BlockSpec((to, None, gk), lambda m, o, k: (o, k, 0))
    s_in = qw.scales.astype(jnp.float32).reshape(out, nk, gk)             # f16 / u8 math is not native on TPU
    z_in = None if qw.sym else qw.zeros.astype(jnp.float32).reshape(out, nk, gk)
  else:
    gt = jnp.pad(weight_layout.tmajor_groups(qw), ((0, 0), (0, nuk - nu)), constant_values=-1)
    e = jax.nn.one_hot(gt, ng, dtype=jnp.bfloat16, axis=1)                  # [cu, ng, nuk]; pad -> 0
    e_spec = pl.BlockSpec((cu, ng, ku), lambda m, o, k: (0, 0, k))
    sz_spec = pl.BlockSpec((to, ng), lambda m, o, k: (o, 0))
    s_in = qw.scales.astype(jnp.float32)
    z_in = None if qw.sym else qw.zeros.astype(jnp.float32)
  x_spec = pl.BlockSpec((cu, tm, ku), lambda m, o, k: (0, m, k))
  q_spec = pl.BlockSpec((to, wu, ku), lambda m, o, k: (o, 0, k))
  args = [xp, q3, s_in, z_in, e]
  specs = [x_spec, q_spec, sz_spec, sz_spec, e_spec]
  if qw.sym:                                                                # no zeros array: drop its slot
    del args[3], specs[3]
  kernel = functools.partial(_uniform_kernel, bits=bits, cu=cu, wu=wu, local=local, sym=bool(qw.sym), cdt=cdt)
  if qw.sym:
    kernel = functools.partial(_drop_z, kernel)
  y = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((mp, out), jnp.float32),
      grid=(mp // tm, pl.cdiv(out, to), nk), in_specs=specs,
      out_specs=pl.BlockSpec((tm, to), lambda m, o, k: (m, o)),
      scratch_shapes=[pltpu.VMEM((tm, to), jnp.float32)], interpret=interpret,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      name="qdllm_uniform_matmul")(*args)
  return y[:n]


def _drop_z(kernel, x_ref, q_ref, s_ref, e_ref, o_ref, acc_ref):
  """Adapter for sym weights (no zeros input): calls `kernel` with z_ref=None."""
  kernel(x_ref, q_ref, s_ref, None, e_ref, o_ref, acc_ref)


def matmul(x2: jax.Array, qw, *, interpret=False) -> jax.Array:
  """y = x2 @ W^T with the TPU kernel of qw's format; float32 [n, out]."""
  if qw.format == "binary_planes":
    return planes_matmul(x2, qw, interpret=interpret)
  return uniform_matmul(x2, qw, interpret=interpret)
