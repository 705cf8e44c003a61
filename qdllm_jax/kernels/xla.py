"""Portable packed matmul in plain jnp/lax: y = x @ W^T without ever building W^ [out, in] whole.

Two regimes, chosen by the static token count n:

* Decode (n <= PLANES_GEMV_MAX_TOKENS, resp. UNIFORM_GEMV_MAX_TOKENS): "bit-serial" products that XLA fuses
  into one elementwise loop over the packed words, then a reduction done as a dot with a ones vector (XLA's
  CPU reduce emitter is much slower than a dot when a heavy elementwise producer is fused into it).
  - binary planes: with z_p = a_c[p] ⊙ x[:, block(p)] (float32),
        y[n, o] = sum_p a_r[p, o] * sum_j (+z_p[n, j] if B_p[o, j] else -z_p[n, j]);
    the inner sum is read from byte lookup tables: all 256 signed sums of every 8 consecutive z (no unpacked
    array exists; one gather per 8 weights).
  - uniform (no act-order, every packing unit inside one group: G a multiple of 32 / gcd(bits, 32)):
        y[n, o] = sum_g s[o, g] sum_{j in g} q[o, j] x[n, j]  -  sum_g s[o, g] z[o, g] X[n, g],
    X[n, g] = sum_{j in g} x[n, j]; q[o, j] is extracted from its unit with a shift and a mask (3 bits: 32 codes
    in 3 words; the 2 codes that cross a word boundary OR in the next word).
* Prefill (larger n; and uniform weights with act-order): W^ is dequantized
  CHUNK_ROWS output rows at a time inside a `lax.map` (the chunk stays in cache) and multiplied with a dense
  dot. Columns are produced in a permuted order in which every slice is a plain shift of the packed words,
  and the activations are permuted to match. The chunk equals `QuantizedWeight.dequantize()` bit for bit in
  float32 (same products and the same summation order).

All functions take x2 [n, in] (float32 or bfloat16) and return float32 [n, out].

Precision: every dot here states it. The dense products of the prefill regime run at `lax.Precision.HIGHEST`
when the activations are float32 and at the default precision for bfloat16 activations (`_dense_precision`):
JAX's DEFAULT precision lets a GPU use TF32 (10-bit mantissa) and a TPU bfloat16 passes for float32 operands
(relative errors ~1e-3), which would make a float32 call much less exact than the float32 it claims, while a
bfloat16 call (what serving uses) gains nothing from more passes. The small helper dots (ones-vector sums,
lookup tables, identity gathers) always use HIGHEST. XLA:CPU computes float32 dots in full float32 at any
precision, so on CPU the setting changes no bit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qdllm_jax.kernels import weight_layout
from qdllm_jax.quant import packed

PLANES_GEMV_MAX_TOKENS = 8   # per-token cost ~ a dense f32 GEMV; beyond, dequantize-and-dot wins
UNIFORM_GEMV_MAX_TOKENS = 8
CHUNK_ROWS = 64
GEMV_DIRECT_BYTES = 28 << 20  # uniform_gemv: float32 accumulators (all tokens) built whole up to this size,
GEMV_CHUNK_BYTES = 8 << 20    # else in row chunks of at most this size (all tokens of a chunk together)
_SIGN = 0x80000000


def _to_f32(x: jax.Array) -> jax.Array:
  """x as float32. bfloat16 is widened with integer ops (exact: the bf16 bits are the f32 high half), which
  XLA:CPU vectorizes inside fused loops, unlike its bf16 -> f32 convert."""
  if x.dtype == jnp.bfloat16:
    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16,
                                    jnp.float32)
  return x.astype(jnp.float32)


def _dense_precision(dtype) -> lax.Precision | None:
  """HIGHEST for float32 operands (no TF32 / bf16-pass shortcut on GPU/TPU), the default for bfloat16."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


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
  kmax = weight_layout.MAX_ORDER
  cdt = x2.dtype
  idx, valid = weight_layout.block_slots(qw.orders, qw.num_planes)
  words = jnp.transpose(~qw.planes[idx], (2, 1, 0, 3))                                 # NOT B [out,3,nb,W]
  ar = jnp.where(valid.T[None], jnp.transpose(qw.a_r.astype(jnp.float32)[idx], (2, 1, 0)), 0.0)  # [out,3,nb]
  ac = jnp.transpose(qw.a_c.astype(jnp.float32)[idx].reshape(nb, kmax, nwords, 32), (1, 3, 0, 2))  # [3,32,nb,W]
  xp = x2.reshape(n, nb, nwords, 32).transpose(0, 3, 1, 2).reshape(n, n_in)
  rows = weight_layout.divisor_at_most(out, CHUNK_ROWS)

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
    return jnp.einsum("ni,ci->nc", xp, wc, precision=_dense_precision(cdt), preferred_element_type=jnp.float32)

  y = lax.map(chunk, (words.reshape(out // rows, rows, kmax, nb, nwords),
                      ar.reshape(out // rows, rows, kmax, nb)))
  return y.transpose(1, 0, 2).reshape(n, out)


def uniform_gemv(x2: jax.Array, qw) -> jax.Array:
  """Decode-regime uniform product (no act-order, units inside groups; see module doc). x2 [n, in] -> [n, out].

  One fused loop over the slots t of the units (slot t by `packed.slot_code`) accumulates float32 [n, rows, nu],
  followed by the group scales and a ones-vector dot over the units. The accumulators are built for all rows at
  once (tokens unrolled: n is small and static) when 4 n out nu <= GEMV_DIRECT_BYTES; beyond, a `lax.map` runs
  over chunks of output rows of at most GEMV_CHUNK_BYTES, all tokens of a chunk in one loop. Reason: XLA:CPU
  allocates the temporaries with malloc, and a block above glibc's 32 MiB mmap-threshold cap is mapped fresh,
  page by page, on every call (int4 4096 x 4096 at 4 tokens: ~8,700 minor page faults per call, ~4x slower),
  while a loop body runs on one thread (1 token: 1.3-2x slower than the whole two-thread loop), so the chunked
  loop is used only where it avoids the faults (docs/benchmarks.md).
  """
  geo = weight_layout.uniform_geometry(qw)
  assert geo["aligned"], "uniform_gemv needs contiguous groups made of whole units (no act-order)"
  n, out = x2.shape[0], qw.shape[0]
  bits, cu, nu, ng, upg = geo["bits"], geo["cu"], geo["nu"], geo["ng"], geo["upg"]
  s = qw.scales.astype(jnp.float32)
  sz = s * weight_layout.zero_points(qw)
  # xs[i, t, u] = x[i, u cu + t], as (exact) identity dots so that XLA materializes it instead of fusing the
  # strided transpose into the hot loop below.
  eye = jnp.eye(cu, dtype=jnp.float32)
  xf = jnp.pad(_to_f32(x2), ((0, 0), (0, geo["n_pad"] - geo["n_in"])))
  xs = jnp.stack([lax.dot_general(eye, xf[i].reshape(nu, cu), (((1,), (1,)), ((), ())),
                                  precision=lax.Precision.HIGHEST) for i in range(n)])  # [n, cu, nu]
  xgs = _sum_cols(_to_f32(x2).reshape(n, ng, geo["G"]))                                # [n, ng] group sums

  def rows_product(xs, xgs, q, sc, szc):
    """[m, C] for m tokens (xs [m, cu, nu], xgs [m, ng]) and the output rows of the packed words q [C, wu nu],
    sc / szc [C, ng]; one fused [m, C, nu] loop over the slots."""
    qk = packed.unit_words(q, bits)                                                    # wu x [C, nu]
    acc = None
    for t in range(cu):
      term = packed.slot_code(qk, t, bits).astype(jnp.float32)[None] * xs[:, t][:, None, :]
      acc = term if acc is None else acc + term                                        # [m, C, nu]
    y1 = _sum_cols((acc.reshape(acc.shape[0], -1, ng, upg) * sc[None, :, :, None]).reshape(acc.shape[0], -1, nu))
    return y1 - _sum_cols(szc[None] * xgs[:, None, :])

  if 4 * n * out * nu <= GEMV_DIRECT_BYTES:  # one loop per token: the pre-chunking code path, timed equal
    return jnp.stack([rows_product(xs[i:i + 1], xgs[i:i + 1], qw.qweight, s, sz)[0] for i in range(n)])
  rows = weight_layout.divisor_at_most(out, max(1, GEMV_CHUNK_BYTES // (4 * n * nu)))
  chunks = (qw.qweight.reshape(out // rows, rows, -1), s.reshape(out // rows, rows, ng),
            sz.reshape(out // rows, rows, ng))
  y = lax.map(lambda a: rows_product(xs, xgs, *a), chunks)
  return y.transpose(1, 0, 2).reshape(n, out)


def uniform_dequant_dot(x2: jax.Array, qw) -> jax.Array:
  """Uniform product by chunked dequantization + dot (any bits, groups, act-order). -> float32 [n, out].

  t-major column order (weight_layout.permute_x_tmajor): W[c, t, u] = s[c, g(t, u)] (q_t[c, u] - z[c, g(t, u)]).
  """
  geo = weight_layout.uniform_geometry(qw)
  n = x2.shape[0]
  out = qw.shape[0]
  bits, cu, nu, ng, wu = geo["bits"], geo["cu"], geo["nu"], geo["ng"], geo["wu"]
  cdt = x2.dtype
  xp = weight_layout.permute_x_tmajor(x2, cu, nu).reshape(n, cu * nu)
  s = qw.scales.astype(jnp.float32)
  z = weight_layout.zero_points(qw)
  gt = None if geo["aligned"] else weight_layout.tmajor_groups(qw)
  rows = weight_layout.divisor_at_most(out, CHUNK_ROWS)

  def chunk(args):
    q, sc, zc = args                                                                   # [C,wu,nu], [C,ng] x2
    if gt is None:
      upg = geo["upg"]
      sw = jnp.broadcast_to(sc[:, None, :, None], (rows, 1, ng, upg)).reshape(rows, 1, nu)
      zw = jnp.broadcast_to(zc[:, None, :, None], (rows, 1, ng, upg)).reshape(rows, 1, nu)
    else:
      sw, zw = jnp.take(sc, gt, axis=1), jnp.take(zc, gt, axis=1)                      # [C, cu, nu]
    qk = [q[:, k] for k in range(wu)]
    code = jnp.stack([packed.slot_code(qk, t, bits) for t in range(cu)], 1).astype(jnp.float32)  # [C,cu,nu]
    wc = (sw * (code - zw)).astype(cdt).reshape(rows, cu * nu)
    return jnp.einsum("nk,ck->nc", xp, wc, precision=_dense_precision(cdt), preferred_element_type=jnp.float32)

  y = lax.map(chunk, (qw.qweight.reshape(out // rows, rows, wu, nu), s.reshape(out // rows, rows, ng),
                      z.reshape(out // rows, rows, ng)))
  return y.transpose(1, 0, 2).reshape(n, out)


def matmul(x2: jax.Array, qw) -> jax.Array:
  """y = x2 @ W^T for a packed weight, float32 [n, out]; picks the decode or prefill regime by n (static)."""
  n = x2.shape[0]
  if qw.format == "binary_planes":
    return planes_gemv(x2, qw) if n <= PLANES_GEMV_MAX_TOKENS else planes_dequant_dot(x2, qw)
  if n <= UNIFORM_GEMV_MAX_TOKENS and weight_layout.uniform_geometry(qw)["aligned"]:
    return uniform_gemv(x2, qw)
  return uniform_dequant_dot(x2, qw)
