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
128-column blocks with a `fori_loop`; errors are pushed right eagerly inside a super-block of m blocks
(masked [C, 128] x [128, out] products) and, at the end of each super-block, to the later super-blocks in
[C, C] chunks, so the cross-block work is close to the exact out * in^2 flops with static shapes. Inside a
block the 128 columns are handled in 8 lazy sub-blocks of 16 (rank-1 updates on [16, out] only), which is
the same arithmetic as the original up to float rounding order (rows left of a column get U[c, :c] = 0 exactly).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from qdllm_jax.errors import QuantizationError
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
  cols = jnp.arange(cw)

  def sbody(s, state):
    wt, carry, outs = state
    base = s * cw
    if superblock_fn is not None:
      carry = superblock_fn(s, wt, carry)
    ws = lax.dynamic_slice_in_dim(wt, base, cw, 0)
    us = lax.dynamic_slice(u, (base, base), (cw, cw))

    def body(j, st):
      ws, carry, outs, es = st
      b = s * m + j
      w1t = lax.dynamic_slice_in_dim(ws, j * block, block, 0)
      e1t, ob, carry = block_fn(b, w1t, ws, j, carry)
      outs = jax.tree.map(lambda o, v: lax.dynamic_update_index_in_dim(o, v, b, 0), outs, ob)
      if compensate and m > 1:
        ub = lax.dynamic_slice_in_dim(us, j * block, block, 0)
        ub = jnp.where(cols[None, :] >= (j + 1) * block, ub, jnp.zeros((), ub.dtype))
        ws = ws - jnp.matmul(ub.T, e1t, precision=_HI)
      es = lax.dynamic_update_slice_in_dim(es, e1t, j * block, 0)
      return ws, carry, outs, es

    es0 = jnp.zeros((cw, out), wt.dtype)
    ws, carry, outs, es = lax.fori_loop(0, m, body, (ws, carry, outs, es0))
    if compensate:
      def trail(c, wt):
        uc = lax.dynamic_slice(u, (base, c * cw), (cw, cw))
        blk = lax.dynamic_slice_in_dim(wt, c * cw, cw, 0)
        return lax.dynamic_update_slice_in_dim(wt, blk - jnp.matmul(uc.T, es, precision=_HI), c * cw, 0)
      wt = lax.fori_loop(s + 1, ns, trail, wt)
    return wt, carry, outs

  _, carry, outs = lax.fori_loop(0, ns, sbody, (wt, carry, outs0))
  return outs, carry


def _gptq_block(w1t, u1, scale_b, zero_b, gl: int, bits: int, sub: int):
  """Column-by-column GPTQ inside one block (W^T rows). Returns (codes uint8, err/d, sum err^2).

  The block's columns are visited in lazy sub-blocks of `sub`: rank-1 updates touch only the sub-block's rows;
  its errors are then pushed to the rest of the block with one [block, sub] x [sub, out] product.
  """
  block, out = w1t.shape
  rows = jnp.arange(block)

  def subblock(s, st):
    w1t, codes, errs, loss = st
    lo = s * sub
    wsb = lax.dynamic_slice_in_dim(w1t, lo, sub, 0)
    urows = lax.dynamic_slice_in_dim(u1, lo, sub, 0)  # [sub, block]
    usb = lax.dynamic_slice_in_dim(urows, lo, sub, 1)  # [sub, sub]

    def col(i, st):
      wsb, qs, es, ls = st
      w = lax.dynamic_index_in_dim(wsb, i, 0, keepdims=False)
      gi = (lo + i) // gl
      sc = lax.dynamic_index_in_dim(scale_b, gi, 0, keepdims=False)
      zr = lax.dynamic_index_in_dim(zero_b, gi, 0, keepdims=False)
      qc = quantize_codes(w, sc, zr, bits)
      q = dequantize_codes(qc, sc, zr)
      urow = lax.dynamic_index_in_dim(usb, i, 0, keepdims=False)
      err = (w - q) / lax.dynamic_index_in_dim(urow, i, 0, keepdims=False)
      wsb = wsb - urow[:, None] * err[None, :]
      qs = lax.dynamic_update_index_in_dim(qs, qc.astype(jnp.uint8), i, 0)
      es = lax.dynamic_update_index_in_dim(es, err, i, 0)
      return wsb, qs, es, ls + jnp.sum(err * err)

    init = (wsb, jnp.zeros((sub, out), jnp.uint8), jnp.zeros((sub, out), w1t.dtype), loss)
    _, qs, es, loss = lax.fori_loop(0, sub, col, init)
    urest = jnp.where(rows[None, :] >= lo + sub, urows, jnp.zeros((), urows.dtype))
    w1t = w1t - jnp.matmul(urest.T, es, precision=_HI)
    codes = lax.dynamic_update_slice_in_dim(codes, qs, lo, 0)
    errs = lax.dynamic_update_slice_in_dim(errs, es, lo, 0)
    return w1t, codes, errs, loss

  init = (w1t, jnp.zeros((block, out), jnp.uint8), jnp.zeros((block, out), w1t.dtype),
          jnp.zeros((), w1t.dtype))
  _, codes, errs, loss = lax.fori_loop(0, block // sub, subblock, init)
  return codes, errs, loss


def gptq_quantize(w, u, channel_scale=None, channel_zero=None, *, bits: int, group_size: int = 128,
                  sym: bool = False, scale_dtype="float16", block: int = 128, sub: int = 16):
  """GPTQ on one weight matrix (columns already in processing order; act-order permutes before).

  Args:
    w: float32 [out, in], dead columns already zeroed.  u: float32 [in, in], U of `prepare_hessian`.
    channel_scale, channel_zero: float32 [out], the per-row parameters for group_size == -1 (the original
      computes them from the unfixed weight); None -> computed from `w`.
    bits: 2..8; group_size: g with (g | 128 and g | in) or (128 | g and g | in) or -1.
    scale_dtype: storage dtype the scales are rounded to before use (None: keep float32).
  Returns:
    dict(codes uint8 [out, in], scales [out, G], zeros [out, G] (integer-valued), w_hat [out, in],
         loss = sum_c ||w_c - q_c||^2 / U_cc^2 / 2), G = in / g (1 for g = -1).
  """
  w, u = jnp.asarray(w), jnp.asarray(u)
  n = w.shape[1]
  g = group_size
  if u.shape != (n, n) or block % sub or not (g == -1 or (n % g == 0 and (block % g == 0 or g % block == 0))):
    raise QuantizationError(f"gptq_quantize: w {w.shape}, u {u.shape}, group_size {g}, block {block}, sub {sub}; "
                            f"expected u [in, in] and g = -1 or g | in with g | block or block | g.")
  if group_size == -1 and channel_scale is None:
    channel_scale, channel_zero = find_params(w, bits, sym, scale_dtype)
  return _gptq_quantize(w, u, channel_scale, channel_zero, bits=int(bits), group_size=int(group_size),
                        sym=bool(sym), scale_dtype=None if scale_dtype is None else jnp.dtype(scale_dtype).name,
                        block=int(block), sub=int(sub))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "scale_dtype", "block", "sub"))
def _gptq_quantize(w, u, channel_scale, channel_zero, *, bits, group_size, sym, scale_dtype, block, sub):
  out, n = w.shape
  npad = -(-n // block) * block
  nb = npad // block
  dt = w.dtype
  wt = jnp.zeros((npad, out), dt).at[:n].set(w.T)
  up = jnp.eye(npad, dtype=dt).at[:n, :n].set(u)
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

  def params_from(x_t):  # x_t [rows, out] (W^T rows of one group) -> [1, out] each
    sc, zr = find_params(x_t.T, bits, sym, scale_dtype)
    return sc[None], zr[None]

  def superblock_fn(s, wt, carry):
    return lax.cond((s * cw) % g == 0, lambda: params_from(lax.dynamic_slice_in_dim(wt, s * cw, g, 0)),
                    lambda: carry)

  def block_fn(b, w1t, ws, j, carry):
    u1 = lax.dynamic_slice(up, (b * block, b * block), (block, block))
    if g != -1 and g <= block:
      sc, zr = find_params(w1t.reshape(block // g, g, out).transpose(0, 2, 1), bits, sym, scale_dtype)
    else:
      if g != -1 and g <= cw:
        carry = lax.cond((j * block) % g == 0,
                         lambda: params_from(lax.dynamic_slice_in_dim(ws, j * block, g, 0)), lambda: carry)
      sc, zr = carry
    codes, e1t, loss = _gptq_block(w1t, u1, sc, zr, gl, bits, min(sub, block))
    return e1t, (codes, sc, zr, loss), carry

  sfn = superblock_fn if (g != -1 and g > cw) else None
  (codes, sc, zr, loss), _ = obc_sweep(wt, up, block_fn, carry, block=block, m=m, superblock_fn=sfn)
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


__all__ = ["superblock_size", "obc_sweep", "gptq_quantize"]
