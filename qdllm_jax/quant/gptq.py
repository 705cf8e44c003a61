"""GPTQ (arXiv 2210.17323) as in the original `fasterquant`, and the blocked OBC sweep shared with DAQ.

Original algorithm (columns in order, Hinv = U upper with (H + delta I)^-1 = U^T U):
    for each lazy block [i1, i1+128):
      W1 = W[:, i1:i2]
      for column i of the block (c = i1 + i):
        if g != -1 and c % g == 0:  scale, zero = find_params(W[:, c:c+g])     # W as at the block's start
        q = Q(W1[:, i]);  err = (W1[:, i] - q) / U_cc;  W1[:, i:] -= err U[c, c:i2]
      W[:, i2:] -= Err1 U[i1:i2, i2:]
    loss = sum (w - q)^2 / U_cc^2 / 2
Group parameters come from `W` (not `W1`), i.e. the weights as updated by all earlier lazy blocks; for
g = 128 that is exactly the fully updated group, for g < 128 a group starting inside a lazy block sees the
block-start values (the original's behaviour, reproduced here). g = -1 uses one set of per-row parameters
computed before the sweep (the original computes them from the layer weight before the dead-column fix).
Act-order (desc_act, static_groups=False) is a column permutation applied by the caller (see `api.py`):
groups are then consecutive in the permuted order.

Implementation: everything runs on W^T ([in, out], a column is a contiguous row). `obc_sweep` processes
super-blocks of m 128-column blocks with a `fori_loop`; inside a super-block (its m blocks unrolled) each
block's errors are pushed eagerly to exactly the later rows of the super-block, and at its end to the later
super-blocks in [C, C] chunks, so the cross-block work is close to the exact out * in^2 flops with static
shapes. Inside a block the 128 columns are handled in 8 lazy sub-blocks of 16: a column is updated left-looking from the
sub-block's earlier errors (one [16] x [16, out] product per column instead of a rank-1 rewrite of the
sub-block), the same arithmetic as the original up to float rounding order.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from qdllm_jax.errors import QuantizationError
from qdllm_jax.quant.hessian import tri_inv_lower
from qdllm_jax.quant.rtn import dequantize_codes, find_params, quantize_codes

_HI = lax.Precision.HIGHEST


def superblock_size(nb: int, group_blocks: int = 1) -> int:
  """Blocks per super-block m in (4, 2, 1): m | nb and (m | group_blocks or group_blocks | m)."""
  for m in (4, 2, 1):
    if nb % m == 0 and (group_blocks % m == 0 or m % group_blocks == 0):
      return m
  return 1


def obc_sweep(wt, u, block_fn, carry, *, block: int, m: int, compensate: bool = True,
              superblock_fn=None):
  """Left-to-right blocked OBC/GPTQ sweep with cross-block error compensation.

  For b = 0..nb-1:  (E_b, out_b, carry) = block_fn(b, Wt[b], Ws, j, carry);  Wt[c] -= U[b, c]^T E_b  for c > b,
  i.e. W[:, c] -= E_b^T U[b, c] in the [out, in] layout (compensate=False skips the update).
  Args:
    wt: float [n, out], W^T with n a multiple of block * m.  u: float [n, n] upper triangular.
    block_fn(b, w1t [block, out], ws [C, out] (live super-block rows), j, carry) -> (e1t [block, out],
      per-block outputs (pytree), carry).  superblock_fn(s, wt, carry) -> carry, called at each super-block
      start (rows >= s*C of wt are then fully updated).
  Returns:
    (stacked per-block outputs with leading axis nb, final carry).
  """
  n, out = wt.shape
  nb = n // block
  cw = m * block
  ns = nb // m
  spec = jax.ShapeDtypeStruct((block, out), wt.dtype)
  sspec = jax.ShapeDtypeStruct((cw, out), wt.dtype)
  ob_shape = jax.eval_shape(lambda w, s, c: block_fn(0, w, s, 0, c)[1], spec, sspec, carry)
  outs0 = jax.tree.map(lambda x: jnp.zeros((nb,) + x.shape, x.dtype), ob_shape)
  lt = u.T  # sliced as [rows, C] left operands: XLA:CPU runs a dot with a transposed lhs ~2x slower

  def sbody(s, state):
    wt, carry, outs = state
    base = s * cw
    if superblock_fn is not None:
      carry = superblock_fn(s, wt, carry)
    ws = lax.dynamic_slice_in_dim(wt, base, cw, 0)
    lts = lax.dynamic_slice(lt, (base, base), (cw, cw))  # U[S, S]^T

    es = []
    for j in range(m):  # unrolled: each block's errors reach exactly the super-block rows after it
      b = s * m + j
      w1t = ws[j * block:(j + 1) * block]
      e1t, ob, carry = block_fn(b, w1t, ws, j, carry)
      outs = jax.tree.map(lambda o, v: lax.dynamic_update_index_in_dim(o, v, b, 0), outs, ob)  # noqa: B023
      if compensate and j + 1 < m:
        ubt = lts[(j + 1) * block:, j * block:(j + 1) * block]  # U[b, later blocks of S]^T
        ws = ws.at[(j + 1) * block:].add(-jnp.matmul(ubt, e1t, precision=_HI))
      es.append(e1t)
    es = jnp.concatenate(es, 0)
    if compensate:
      def trail(c, wt):
        uct = lax.dynamic_slice(lt, (c * cw, base), (cw, cw))  # U[S, C]^T
        blk = lax.dynamic_slice_in_dim(wt, c * cw, cw, 0)
        return lax.dynamic_update_slice_in_dim(wt, blk - jnp.matmul(uct, es, precision=_HI), c * cw, 0)
      wt = lax.fori_loop(s + 1, ns, trail, wt)
    return wt, carry, outs

  _, carry, outs = lax.fori_loop(0, ns, sbody, (wt, carry, outs0))
  return outs, carry


def _gptq_block(w1t, u1, scale_b, zero_b, gl: int, bits: int, sub: int):
  """Column-by-column GPTQ inside one block (W^T rows) of the original: w1t [block, out] the block's weights as
  updated by all earlier blocks, u1 [block, block] U's diagonal block. Returns (codes uint8 [block, out],
  quantized values q [block, out], sum of err^2 with err = (w - q) / U_cc).

  The block's columns are visited in lazy sub-blocks of `sub`: each column is updated left-looking from the
  sub-block's earlier errors; the sub-block's errors are then pushed to the rest of the block with one
  [block, sub] x [sub, out] product.
  """
  block, out = w1t.shape
  rows = jnp.arange(block)
  u1t = u1.T

  def subblock(s, st):
    w1t, codes, vals, loss = st
    lo = s * sub
    wsb = lax.dynamic_slice_in_dim(w1t, lo, sub, 0)
    urows = lax.dynamic_slice_in_dim(u1, lo, sub, 0)  # [sub, block]
    usb = lax.dynamic_slice_in_dim(urows, lo, sub, 1)  # [sub, sub]
    urt = lax.dynamic_slice_in_dim(u1t, lo, sub, 1)  # [block, sub] = urows^T

    usbt = usb.T

    def col(i, st):  # few ops per column (the loop runs `in` times): codes stay float, q and loss after
      qs, es = st
      ucol = lax.dynamic_index_in_dim(usbt, i, 0, keepdims=False)  # U[sub-block rows, c]
      # left-looking: column c as updated by the sub-block's earlier columns (rows >= i of es are still 0); a
      # [sub] x [sub, out] product reads es once instead of a rank-1 rewrite of the sub-block per column
      w = lax.dynamic_index_in_dim(wsb, i, 0, keepdims=False) - jnp.matmul(ucol, es, precision=_HI)
      gi = (lo + i) // gl
      sc = lax.dynamic_index_in_dim(scale_b, gi, 0, keepdims=False)
      zr = lax.dynamic_index_in_dim(zero_b, gi, 0, keepdims=False)
      qc = quantize_codes(w, sc, zr, bits)
      err = (w - dequantize_codes(qc, sc, zr)) / lax.dynamic_index_in_dim(ucol, i, 0, keepdims=False)
      return lax.dynamic_update_index_in_dim(qs, qc, i, 0), lax.dynamic_update_index_in_dim(es, err, i, 0)

    init = (jnp.zeros((sub, out), w1t.dtype), jnp.zeros((sub, out), w1t.dtype))
    qs, es = lax.fori_loop(0, sub, col, init)
    gi = (lo + jnp.arange(sub)) // gl
    vs = dequantize_codes(qs, jnp.take(scale_b, gi, axis=0), jnp.take(zero_b, gi, axis=0))
    qs = qs.astype(jnp.uint8)
    loss = loss + jnp.sum(es * es)
    urest = jnp.where(rows[:, None] >= lo + sub, urt, jnp.zeros((), urt.dtype))
    w1t = w1t - jnp.matmul(urest, es, precision=_HI)
    codes = lax.dynamic_update_slice_in_dim(codes, qs, lo, 0)
    vals = lax.dynamic_update_slice_in_dim(vals, vs, lo, 0)
    return w1t, codes, vals, loss

  init = (w1t, jnp.zeros((block, out), jnp.uint8), jnp.zeros((block, out), w1t.dtype),
          jnp.zeros((), w1t.dtype))
  _, codes, vals, loss = lax.fori_loop(0, block // sub, subblock, init)
  return codes, vals, loss


def gptq_quantize(w, u=None, channel_scale=None, channel_zero=None, *, v=None, bits: int, group_size: int = 128,
                  sym: bool = False, scale_dtype="float16", block: int = 128, sub: int = 16):
  """GPTQ on one weight matrix (columns already in processing order; act-order permutes before).

  Args:
    w: float32 [out, in], dead columns already zeroed.
    u: float [in, in], U of `prepare_hessian` ((H + delta I)^-1 = U^T U), or None when `v` is given.
    v: float [in, in], V = U^-1 of `prepare_hessian(..., factor="cholesky")` (H + delta I = V V^T, upper);
      the fast path: no triangular inverse of the whole factor is formed (see `_gptq_quantize`).
    channel_scale, channel_zero: float32 [out], the per-row parameters for group_size == -1 (the original
      computes them from the unfixed weight); None -> computed from `w`.
    bits: 2..8; group_size: g with (g | 128 and g | in) or (128 | g and g | in) or -1.
    scale_dtype: storage dtype the scales are rounded to before use (None: keep float32).
  Returns:
    dict(codes uint8 [out, in], scales [out, G], zeros [out, G] (integer-valued), w_hat [out, in],
         loss = sum_c ||w_c - q_c||^2 / U_cc^2 / 2), G = in / g (1 for g = -1).
  """
  w = jnp.asarray(w)
  n = w.shape[1]
  g = group_size
  fac = v if u is None else u
  if (u is None) == (v is None) or jnp.shape(fac) != (n, n) or block % sub or not (
      g == -1 or (n % g == 0 and (block % g == 0 or g % block == 0))):
    raise QuantizationError(f"gptq_quantize: w {w.shape}, u {None if u is None else jnp.shape(u)}, "
                            f"v {None if v is None else jnp.shape(v)}, group_size {g}, block {block}, sub {sub}; "
                            f"expected exactly one of u, v [in, in] and g = -1 or g | in with g | block or block | g.")
  v = upper_inverse(jnp.asarray(u)) if v is None else jnp.asarray(v)
  if group_size == -1 and channel_scale is None:
    channel_scale, channel_zero = find_params(w, bits, sym, scale_dtype)
  return _gptq_quantize(w, v, channel_scale, channel_zero, bits=int(bits), group_size=int(group_size),
                        sym=bool(sym), scale_dtype=None if scale_dtype is None else jnp.dtype(scale_dtype).name,
                        block=int(block), sub=int(sub))


@jax.jit
def upper_inverse(u):
  """U^-1 of an upper triangular u [n, n] (= tri_inv_lower(U^T)^T); float, upper triangular."""
  return jnp.triu(tri_inv_lower(u.T).T)


def _diag_block_inverses(v, width: int):
  """[n / width, width, width]: the inverses of v's diagonal width x width blocks (v upper triangular [n, n]);
  they are U's diagonal blocks, U = v^-1."""
  k = v.shape[0] // width
  idx = jnp.arange(k)
  vd = v.reshape(k, width, k, width)[idx, :, idx, :]
  eye = jnp.broadcast_to(jnp.eye(width, dtype=v.dtype), vd.shape)
  return jnp.triu(jax.scipy.linalg.solve_triangular(vd, eye, lower=False))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "scale_dtype", "block", "sub"))
def _gptq_quantize(w, v, channel_scale, channel_zero, *, bits, group_size, sym, scale_dtype, block, sub):
  """The original's sweep computed from V (H + delta I = V V^T, V = U^-1 upper) instead of U.

  With E = W - Q (original weights minus quantized ones) and e_c = (w'_c - q_c) / U_cc the original's scaled
  errors, w_c - q_c = sum_{k <= c} e_k U_kc, i.e. E = e U and e = E V. The original's W as updated by the
  lazy blocks before column k, restricted to the columns J = [k, k + m), is then
      W_J - e_{<k} U_{<k, J} = W_J + (E_{<k} V_{<k, J}) inv(V_JJ)        (block inverse of upper triangular V)
  so the sweep accumulates D = E V (the same out * in^2 flops as the original's Err1 Hinv[i1:i2, i2:] updates)
  and turns D into the original's block (and group) start values with the inverse of V's 128 x 128 (or g x g)
  diagonal block. U itself is never formed: one Cholesky of H is all the factorisation needed.
  """
  out, n = w.shape
  npad = -(-n // block) * block
  nb = npad // block
  dt = w.dtype
  wt = jnp.zeros((npad, out), dt).at[:n].set(w.T)
  vp = v.astype(dt) if npad == n else jnp.eye(npad, dtype=dt).at[:n, :n].set(v)
  g = group_size
  if g == -1:
    gl, gb = block, 1
    carry = (channel_scale[None].astype(dt), channel_zero[None].astype(dt))
  elif g <= block:
    gl, gb = g, 1
    carry = ()
  else:
    gl, gb = block, g // block
    carry = (jnp.zeros((1, out), dt), jnp.zeros((1, out), dt))
  m = superblock_size(nb, gb)
  cw = m * block
  gw = g if g > block else block
  udt = jnp.swapaxes(_diag_block_inverses(vp, gw), 1, 2)  # [npad / gw, gw, gw]: U's diagonal blocks, transposed

  def params_from(c, d_t):  # group start column c, d_t [g, out] (D rows of the group) -> [1, out] each
    x_t = lax.dynamic_slice_in_dim(wt, c, g, 0) + jnp.matmul(udt[c // g], d_t, precision=_HI)
    sc, zr = find_params(x_t.T, bits, sym, scale_dtype)
    return sc[None], zr[None]

  def superblock_fn(s, dacc, carry):
    c = s * cw
    return lax.cond(c % g == 0, lambda: params_from(c, lax.dynamic_slice_in_dim(dacc, c, g, 0)), lambda: carry)

  def block_fn(b, d1t, ds, j, carry):
    c = b * block
    ugt = lax.dynamic_index_in_dim(udt, c // gw, 0, keepdims=False)
    u1t = lax.dynamic_slice(ugt, (c % gw, c % gw), (block, block))
    u1 = u1t.T
    w_b = lax.dynamic_slice_in_dim(wt, c, block, 0)
    w1t = w_b + jnp.matmul(u1t, d1t, precision=_HI)  # the original's W1 at the block's start
    if g != -1 and g <= block:
      sc, zr = find_params(w1t.reshape(block // g, g, out).transpose(0, 2, 1), bits, sym, scale_dtype)
    else:
      if g != -1 and g <= cw:
        carry = lax.cond((j * block) % g == 0,
                         lambda: params_from(c, lax.dynamic_slice_in_dim(ds, j * block, g, 0)), lambda: carry)
      sc, zr = carry
    codes, q, loss = _gptq_block(w1t, u1, sc, zr, gl, bits, min(sub, block))
    return q - w_b, (codes, sc, zr, loss), carry  # -E: obc_sweep subtracts V^T (-E) from D

  sfn = superblock_fn if (g != -1 and g > cw) else None
  (codes, sc, zr, loss), _ = obc_sweep(jnp.zeros_like(wt), vp, block_fn, carry, block=block, m=m,
                                       superblock_fn=sfn)
  codes = codes.reshape(npad, out)[:n].T
  if g == -1:
    scales, zeros = sc[0, 0][:, None], zr[0, 0][:, None]
  elif g <= block:
    scales = sc.reshape(npad // g, out)[:n // g].T
    zeros = zr.reshape(npad // g, out)[:n // g].T
  else:
    scales, zeros = sc[::gb, 0].T, zr[::gb, 0].T
  gidx = jnp.arange(n) // (n if g == -1 else g)
  w_hat = dequantize_codes(codes.astype(dt), scales[:, gidx], zeros[:, gidx])
  return dict(codes=codes, scales=scales, zeros=zeros, w_hat=w_hat, loss=jnp.sum(loss) / 2)


__all__ = ["superblock_size", "obc_sweep", "gptq_quantize", "upper_inverse"]
