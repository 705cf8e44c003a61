"""Portable packed matmul in plain jnp/lax: y = x @ W^T without ever building W^ [out, in] whole.

Two regimes, chosen by the static token count n:

* Decode (n <= PLANES_GEMV_MAX_TOKENS, resp. UNIFORM_GEMV_MAX_TOKENS): "bit-serial" products that XLA fuses
  into one elementwise loop over the packed words, then a reduction done as a dot with a ones vector (XLA's
  CPU reduce emitter is much slower than a dot when a heavy elementwise producer is fused into it).
  - binary planes: with z_p = a_c[p] ⊙ x[:, block(p)] (float32),
        y[n, o] = sum_p a_r[p, o] * sum_j (+z_p[n, j] if B_p[o, j] else -z_p[n, j]);
    the inner sum is read from byte lookup tables: all 256 signed sums of every 8 consecutive z (no unpacked
    array exists; one gather per 8 weights).
  - uniform (no act-order, groups made of whole words: 2/4/8 bits):
        y[n, o] = sum_g s[o, g] sum_{j in g} q[o, j] x[n, j]  -  sum_g s[o, g] z[o, g] X[n, g],
    X[n, g] = sum_{j in g} x[n, j]; q[o, j] is extracted from its word with a shift and a mask.
  - uniform with words straddling groups (3 bits: 10 codes per word, G = 128): the aligned loop credits every
    word to the group of its first column (its scale, gathered per word, fuses into the loop); the codes of
    the few straddling words past the boundary then get the next group's scale (a small [out, #straddling]
    correction), then the zero points.
* Prefill (larger n; and uniform weights with act-order): W^ is dequantized
  CHUNK_ROWS output rows at a time inside a `lax.map` (the chunk stays in cache) and multiplied with a dense
  dot. Columns are produced in a permuted order in which every slice is a plain shift of the packed words,
  and the activations are permuted to match. The chunk equals `QuantizedWeight.dequantize()` bit for bit in
  float32 (same products and the same summation order).

All functions take x2 [n, in] (float32 or bfloat16) and return float32 [n, out].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qdllm_jax.kernels import common

PLANES_GEMV_MAX_TOKENS = 8   # per-token cost ~ a dense f32 GEMV; beyond, dequantize-and-dot wins
UNIFORM_GEMV_MAX_TOKENS = 4
CHUNK_ROWS = 64
_SIGN = 0x80000000


def _to_f32(x: jax.Array) -> jax.Array:
  """x as float32. bfloat16 is widened with integer ops (exact: the bf16 bits are the f32 high half), which
  XLA:CPU vectorizes inside fused loops, unlike its bf16 -> f32 convert."""
  if x.dtype == jnp.bfloat16:
    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16,
                                    jnp.float32)
  return x.astype(jnp.float32)


def _sum_rows(a: jax.Array) -> jax.Array:
  """sum over axis 0 of a [k, ...] as a ones-vector dot (float32, exact f32 precision)."""
  k = a.shape[0]
  flat = a.reshape(k, -1)
  s = jnp.dot(jnp.ones((k,), jnp.float32), flat, precision=lax.Precision.HIGHEST,
              preferred_element_type=jnp.float32)
  return s.reshape(a.shape[1:])


def _sum_cols(a: jax.Array) -> jax.Array:
  """sum over the last axis of a [..., k] as a ones-vector dot (float32)."""
  k = a.shape[-1]
  s = jnp.dot(a.reshape(-1, k), jnp.ones((k,), jnp.float32), precision=lax.Precision.HIGHEST,
              preferred_element_type=jnp.float32)
  return s.reshape(a.shape[:-1])


_BYTE_SIGNS = np.array([[1.0 if (b >> i) & 1 else -1.0 for i in range(8)] for b in range(256)], np.float32)


def planes_gemv(x2: jax.Array, qw) -> jax.Array:
  """Decode-regime binary-planes product by byte lookup tables (see module doc). x2 [n, in] -> float32 [n, out].

  Per token and plane p, the table T_p[m, v] = sum_{i < 8} (+z_p[8m + i] if bit i of v else -z_p[8m + i])
  ([bs/8, 256], one small matmul with the 256 x 8 sign matrix) holds every signed sum of 8 activations; each
  weight byte then costs one gather and one add instead of 8 bit extractions. Tokens are unrolled (n is small
  and static; a `lax.map`/`vmap` over tokens compiles to a much slower loop nest on XLA:CPU).
  """
  n, n_in = x2.shape
  bs = qw.group_size
  nb, nwords = n_in // bs, bs // 32
  p_count = qw.planes.shape[0]
  a_c = qw.a_c.astype(jnp.float32)
  a_r = qw.a_r.astype(jnp.float32)
  signs = jnp.asarray(_BYTE_SIGNS)
  base = jnp.arange(p_count, dtype=jnp.uint32)[:, None] * jnp.uint32(bs // 8 * 256)          # [P, 1]

  def one(xt):                                                                         # xt [in]
    z = jnp.take(_to_f32(xt).reshape(nb, bs), qw.plane_block, axis=0) * a_c             # [P, bs]
    table = jnp.einsum("pmi,vi->pmv", z.reshape(p_count, bs // 8, 8), signs,
                       precision=lax.Precision.HIGHEST).reshape(-1)                    # [P * bs/8 * 256]
    acc = None
    for w in range(nwords):
      word = qw.planes[:, :, w]                                                        # [P, out]
      for k in range(4):                                                               # byte k: columns 32w+8k..
        idx = base + jnp.uint32((4 * w + k) * 256) + ((word >> jnp.uint32(8 * k)) & jnp.uint32(255))
        term = jnp.take(table, idx.astype(jnp.int32), axis=0)
        acc = term if acc is None else acc + term
    return _sum_rows(acc * a_r)

  return jnp.stack([one(x2[t]) for t in range(x2.shape[0])])


def planes_dequant_dot(x2: jax.Array, qw) -> jax.Array:
  """Prefill-regime binary-planes product: chunked dequantization + dot. x2 [n, in] -> float32 [n, out].

  Columns are ordered (i, b, w) for input column b*bs + 32 w + i, so slice i is a plain shift of the words;
  chunk rows c:
    W[c, i, b, w] = sum_{k < 3} (+v if bit i of word w of slot k else -v),  v = a_r[k, c] a_c[k, 32 w + i],
  with v = 0 for slots past the block's order.
  """
  n, n_in = x2.shape
  out = qw.shape[0]
  bs = qw.group_size
  nb, nwords = n_in // bs, bs // 32
  kmax = common.MAX_ORDER
  cdt = x2.dtype
  idx, valid = common.block_slots(qw.orders, qw.num_planes)
  words = jnp.transpose(~qw.planes[idx], (2, 1, 0, 3))                                 # NOT B [out,3,nb,W]
  ar = jnp.where(valid.T[None], jnp.transpose(qw.a_r.astype(jnp.float32)[idx], (2, 1, 0)), 0.0)  # [out,3,nb]
  ac = jnp.transpose(qw.a_c.astype(jnp.float32)[idx].reshape(nb, kmax, nwords, 32), (1, 3, 0, 2))  # [3,32,nb,W]
  xp = x2.reshape(n, nb, nwords, 32).transpose(0, 3, 1, 2).reshape(n, n_in)
  rows = common.divisor_at_most(out, CHUNK_ROWS)

  shifts = (31 - jnp.arange(32, dtype=jnp.uint32))[None, :, None, None]                # over i

  def chunk(args):
    wd, r = args                                                                       # [C,3,nb,W], [C,3,nb]
    acc = None
    for k in range(kmax):                                                              # one fusion [C,32,nb,W]
      v = lax.bitcast_convert_type(r[:, k, None, :, None] * ac[None, k], jnp.uint32)
      flip = (wd[:, k, None] << shifts) & jnp.uint32(_SIGN)
      t = lax.bitcast_convert_type(v ^ flip, jnp.float32)
      acc = t if acc is None else acc + t
    wc = acc.astype(cdt).reshape(rows, n_in)
    return jnp.einsum("ni,ci->nc", xp, wc, preferred_element_type=jnp.float32)

  y = lax.map(chunk, (words.reshape(out // rows, rows, kmax, nb, nwords),
                      ar.reshape(out // rows, rows, kmax, nb)))
  return y.transpose(1, 0, 2).reshape(n, out)


def uniform_gemv(x2: jax.Array, qw) -> jax.Array:
  """Decode-regime uniform product (aligned groups only; see module doc). x2 [n, in] -> float32 [n, out].

  Tokens are unrolled (n is small and static), each one fused loop over the [out, nw] words, followed by the
  group scales and a ones-vector dot over the words.
  """
  geo = common.uniform_geometry(qw)
  assert geo["aligned"], "uniform_gemv needs groups made of whole words and no act-order"
  out = qw.shape[0]
  bits, cpw, nw, ng, g = geo["bits"], geo["cpw"], geo["nw"], geo["ng"], geo["G"]
  q = qw.qweight
  mask = jnp.uint32(2 ** bits - 1)
  s = qw.scales.astype(jnp.float32)
  sz = s * common.zero_points(qw)

  def one(xt):                                                                         # xt [in]
    # xp[t, w] = x[w cpw + t], as an (exact) identity dot so that XLA materializes it instead of fusing the
    # strided transpose into the hot loop below.
    eye = jnp.eye(cpw, dtype=jnp.float32)
    xp = lax.dot_general(eye, _to_f32(xt).reshape(nw, cpw), (((1,), (1,)), ((), ())),
                         precision=lax.Precision.HIGHEST)                              # [cpw, nw]
    acc = None
    for t in range(cpw):
      term = ((q >> jnp.uint32(bits * t)) & mask).astype(jnp.float32) * xp[t][None, :]
      acc = term if acc is None else acc + term                                        # [out, nw]
    y1 = _sum_cols((acc.reshape(out, ng, g // cpw) * s[:, :, None]).reshape(out, nw))
    xg = _sum_cols(_to_f32(xt).reshape(ng, g))                                         # [ng]
    return y1 - _sum_cols(sz * xg[None, :])

  return jnp.stack([one(x2[t]) for t in range(x2.shape[0])])


def _word_scales(s: jax.Array, cpw: int, g: int, nw: int) -> jax.Array:
  """S[o, w] = s[o, floor(w cpw / G)] for s [out, ng] -> [out, nw], without a gather (XLA:CPU runs gathers as
  scalar loops). The pattern repeats every Wp = lcm(cpw, G) / cpw words spanning Gp = lcm / G groups, group j of
  a period covering r_j words: per period, each group's scale is broadcast r_j times and the pieces concatenated
  (one fused elementwise loop)."""
  period = int(np.lcm(cpw, g))
  wp, gp = period // cpw, period // g
  r = np.bincount(np.arange(wp) * cpw // g, minlength=gp)
  pn = -(-nw // wp)
  out, ng = s.shape
  sp = jnp.pad(s, ((0, 0), (0, pn * gp - ng))).reshape(out, pn, gp) if pn * gp > ng else \
      s[:, :pn * gp].reshape(out, pn, gp)
  pieces = [jnp.broadcast_to(sp[:, :, j, None], (out, pn, int(r[j]))) for j in range(gp)]
  return jnp.concatenate(pieces, axis=-1).reshape(out, pn * wp)[:, :nw]


def _cols(a: jax.Array, idx) -> jax.Array:
  """a[..., idx] for a short static index list, as static slices (no gather)."""
  return jnp.concatenate([a[..., int(i):int(i) + 1] for i in idx], axis=-1)


def uniform_gemv_straddle(x2: jax.Array, qw) -> jax.Array:
  """Decode-regime uniform product when words straddle groups (no act-order, G >= codes per word); see the
  module doc. x2 [n, in] -> float32 [n, out].

  The hot loop is the aligned one: A[o, w] = sum_t q_t[o, w] x[w cpw + t] over all words, scaled by the scale
  of the group g0(w) of each word's first column: S[o, w] = s[o, g0(w)] (`_word_scales`, once per call, shared
  by the tokens; the group sums then cost no matmul). The few words that straddle a boundary
  (at most one per group) are then corrected: their codes past the boundary,
  B[o, s] = sum_{t >= b(s)} q_t[o, w_s] x[w_s cpw + t], belong to g0 + 1:
      y[o] = sum_w S[o, w] A[o, w] + sum_s (s[o, g0(w_s) + 1] - s[o, g0(w_s)]) B[o, s] - sum_g s z[o, g] X[g].
  """
  geo = common.uniform_geometry(qw)
  bits, cpw, nw, ng, g, n_in = geo["bits"], geo["cpw"], geo["nw"], geo["ng"], geo["G"], geo["n_in"]
  assert qw.g_idx is None and g >= cpw, "uniform_gemv_straddle needs contiguous groups of >= cpw columns"
  q = qw.qweight
  mask = jnp.uint32(2 ** bits - 1)
  s = qw.scales.astype(jnp.float32)
  sz = s * common.zero_points(qw)
  cols = np.arange(nw * cpw).reshape(nw, cpw)
  gcol = np.minimum(cols, n_in - 1) // g                                               # [nw, cpw]
  g0 = gcol[:, 0]
  ws = np.nonzero(gcol[:, -1] != g0)[0]                                                # straddling words
  sw = _word_scales(s, cpw, g, nw)                                                     # [out, nw]
  if len(ws):  # the straddling words' codes, scales and tail masks, by static slices
    ds = _cols(s, g0[ws] + 1) - _cols(s, g0[ws])                                       # [out, S]
    tail = jnp.asarray((gcol[ws] != g0[ws, None]).T, jnp.float32)                     # [cpw, S]
    qs = _cols(q, ws)                                                                  # [out, S]

  def one(xt):                                                                         # xt [in]
    xf = jnp.pad(_to_f32(xt), (0, nw * cpw - n_in))
    eye = jnp.eye(cpw, dtype=jnp.float32)
    xp = lax.dot_general(eye, xf.reshape(nw, cpw), (((1,), (1,)), ((), ())),
                         precision=lax.Precision.HIGHEST)                              # [cpw, nw]
    acc = None
    for t in range(cpw):
      term = ((q >> jnp.uint32(bits * t)) & mask).astype(jnp.float32) * xp[t][None, :]
      acc = term if acc is None else acc + term                                        # [out, nw]
    y = _sum_cols(acc * sw)
    if len(ws):
      xb = _cols(xp, ws) * tail                                                        # [cpw, S]
      b = sum(((qs >> jnp.uint32(bits * t)) & mask).astype(jnp.float32) * xb[t][None, :] for t in range(cpw))
      y = y + _sum_cols(b * ds)
    xg = _sum_cols(xf[:n_in].reshape(ng, g))                                           # [ng]
    return y - _sum_cols(sz * xg[None, :])

  return jnp.stack([one(x2[t]) for t in range(x2.shape[0])])


def uniform_dequant_dot(x2: jax.Array, qw) -> jax.Array:
  """Uniform product by chunked dequantization + dot (any bits, groups, act-order). -> float32 [n, out].

  t-major column order (common.permute_x_tmajor): W[c, t, w] = s[c, g(t, w)] (q_t[c, w] - z[c, g(t, w)]).
  """
  geo = common.uniform_geometry(qw)
  n = x2.shape[0]
  out = qw.shape[0]
  bits, cpw, nw, ng = geo["bits"], geo["cpw"], geo["nw"], geo["ng"]
  cdt = x2.dtype
  xp = common.permute_x_tmajor(x2, cpw, nw).reshape(n, cpw * nw)
  s = qw.scales.astype(jnp.float32)
  z = common.zero_points(qw)
  gt = None if geo["aligned"] else common.tmajor_groups(qw)
  rows = common.divisor_at_most(out, CHUNK_ROWS)
  mask = jnp.uint32(2 ** bits - 1)

  shifts = (bits * jnp.arange(cpw, dtype=jnp.uint32))[None, :, None]                   # over t

  def chunk(args):
    q, sc, zc = args                                                                   # [C,nw], [C,ng] x2
    if gt is None:
      wpg = geo["G"] // cpw
      sw = jnp.broadcast_to(sc[:, None, :, None], (rows, 1, ng, wpg)).reshape(rows, 1, nw)
      zw = jnp.broadcast_to(zc[:, None, :, None], (rows, 1, ng, wpg)).reshape(rows, 1, nw)
    else:
      sw, zw = jnp.take(sc, gt, axis=1), jnp.take(zc, gt, axis=1)                      # [C, cpw, nw]
    code = ((q[:, None, :] >> shifts) & mask).astype(jnp.float32)                      # one fusion [C,cpw,nw]
    wc = (sw * (code - zw)).astype(cdt).reshape(rows, cpw * nw)
    return jnp.einsum("nk,ck->nc", xp, wc, preferred_element_type=jnp.float32)

  y = lax.map(chunk, (qw.qweight.reshape(out // rows, rows, nw), s.reshape(out // rows, rows, ng),
                      z.reshape(out // rows, rows, ng)))
  return y.transpose(1, 0, 2).reshape(n, out)


def matmul(x2: jax.Array, qw) -> jax.Array:
  """y = x2 @ W^T for a packed weight, float32 [n, out]; picks the decode or prefill regime by n (static)."""
  n = x2.shape[0]
  if qw.format == "binary_planes":
    return planes_gemv(x2, qw) if n <= PLANES_GEMV_MAX_TOKENS else planes_dequant_dot(x2, qw)
  geo = common.uniform_geometry(qw)
  if n <= UNIFORM_GEMV_MAX_TOKENS and geo["aligned"]:
    return uniform_gemv(x2, qw)
  if n <= UNIFORM_GEMV_MAX_TOKENS and qw.g_idx is None and geo["G"] >= geo["cpw"]:
    return uniform_gemv_straddle(x2, qw)
  return uniform_dequant_dot(x2, qw)
