"""DAQ: Quant-dLLM's data-aware any-order binary quantizer (ARB-RC lineage), with cross-block compensation.

One 128-column block W1 [r, c] of order K in {1, 2, 3} is approximated by
    W^ = sum_k (a_r^k a_c^k^T) ⊙ B_k,   B_k in {-1, +1}^{r x c},  a_r^k [r],  a_c^k [c]        (no offset)
as in the released `binary_arb.py` (Quant-dLLM, arXiv 2510.03274, DAQ; ZTA2785/Quant-dLLM):
  DOR  Z = W1^2 / (d^2 + 1e-12);  z = (Z - mean Z) / (std_unbiased Z + 1e-12);  O = {Z : |z| > outlier_z}
       e = salient_weight where Z >= min(O) (if O is non-empty) else 1;   dor=False -> e = 1.
       d = diag(U) ("chol") or sqrt(diag((H + delta I)^-1)) = column norms of U ("inv_diag").
  init (greedy, unweighted), R = W1, for k = 1..K:
       a_r^k = mean_j |R_ij|;  a_c^k = mean_i |R_ij| / (a_r^k_i + 1e-12);  B_k = sgn(R);  R -= (a_r^k a_c^k^T) ⊙ B_k
  RSR  repeat `iters` times:  for k = 1..K (latest values):  Wt = W1 - sum_{l != k} (a_r^l a_c^l^T) ⊙ B_l
         a_r^k = sum_j e P Wt / (sum_j e P^2 + 1e-8),  P = a_c^k ⊙ B_k (row-broadcast)
         a_c^k = sum_i e Q Wt / (sum_i e Q^2 + 1e-8),  Q = a_r^k ⊙ B_k (new a_r^k)
       then, if K >= 2, joint re-rounding: B = argmin_{s in {±1}^K} |W1 - sum_k s_k a_r^k a_c^k^T| per entry,
       pattern index sum_k [s_k = +1] 2^(K-k) (s_1 most significant, -1 -> bit 0), ties -> lowest index.
       K = 1 keeps B = sgn(W1). The returned scales predate the last B update (no refit after it).
  sgn(x) = +1 for x >= 0 else -1: a binary plane cannot hold 0. The released code's sign(0) = 0 differs only
  where an entry of W1 (or of a greedy residual) is exactly 0; for a whole zero column (dead column) both give
  identical results because that column's a_c is 0 from the start and stays 0.
  Storage: the final scales are rounded to `scale_dtype` and W^ is recomputed with them, so W^ is exactly what
  the packed weight dequantizes to.
Compensation (`BRAGPTQ.fasterquant`): blocks left to right, E = (W1 - W^1) / d_b (d_b = diag U of the block),
W[:, > b] -= E U[b, > b], loss += sum E^2 / 2; no updates inside a block.
`comp_mode="block"` (not in the paper or its code) uses the exact OBS update for a jointly quantized block instead:
with H^-1 = U^T U and the block S leading the remaining columns R, the optimal change of R given the error
delta = W1 - W^1 is  -delta [H^-1]_SS^-1 [H^-1]_SR = -delta U_SS^-1 U_SR,  so E = delta U_SS^-1 (a triangular
solve); the released diagonal form equals it only when U_SS is diagonal, i.e. when the block's input channels are
uncorrelated given the earlier ones. GPTQ's column-by-column updates compose to the same exact update.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from qdllm_jax.errors import QuantizationError
from qdllm_jax.quant.gptq import obc_sweep, superblock_size
from qdllm_jax.quant.packed import pack_signs, plane_sum

MAX_ORDER = 3
_HI = lax.Precision.HIGHEST


def _rows_sum(x, axis_name):
  """sum over axis 0 (the output rows) of x, across the devices of `axis_name` when rows are sharded."""
  s = jnp.sum(x, axis=0)
  return s if axis_name is None else lax.psum(s, axis_name)


def _all_sum(x, axis_name):
  s = jnp.sum(x)
  return s if axis_name is None else lax.psum(s, axis_name)


def sgn(x):
  """Binary sign: +1 where x >= 0, -1 elsewhere (x.dtype)."""
  return jnp.where(x >= 0, jnp.ones((), x.dtype), -jnp.ones((), x.dtype))


def salience_weights(w1, d, outlier_z: float = 2.0, salient_weight: float = 3.0, axis_name=None):
  """DOR weights e [r, c] for a block w1 [r, c] and d [c] (see module doc). With rows sharded over the mesh
  axis `axis_name`, the z-score statistics and the threshold are taken over all rows of all devices."""
  z_ = w1 * w1 / (d[None, :] * d[None, :] + 1e-12)
  cnt = _all_sum(jnp.ones((), z_.dtype), axis_name) * z_.size
  mu = _all_sum(z_, axis_name) / cnt
  sd = jnp.sqrt(_all_sum((z_ - mu) ** 2, axis_name) / (cnt - 1))
  z = (z_ - mu) / (sd + 1e-12)
  out = jnp.abs(z) > outlier_z
  thr = jnp.min(jnp.where(out, z_, jnp.inf))
  anyo = jnp.any(out)
  if axis_name is not None:
    thr, anyo = lax.pmin(thr, axis_name), lax.pmax(anyo.astype(jnp.int32), axis_name) > 0
  sal = anyo & (z_ >= thr)
  return jnp.where(sal, jnp.asarray(salient_weight, w1.dtype), jnp.ones((), w1.dtype))


def greedy_init(w1, order: int, axis_name=None):
  """Greedy residual init. Returns a_r [K, r], a_c [K, c], B [K, r, c] (±1, w1.dtype)."""
  r = w1
  ars, acs, bs = [], [], []
  rows = _all_sum(jnp.ones((), w1.dtype), axis_name) * w1.shape[0]
  for _ in range(order):
    ab = jnp.abs(r)
    ar = jnp.mean(ab, axis=1)
    ac = _rows_sum(ab / (ar[:, None] + 1e-12), axis_name) / rows
    b = sgn(r)
    r = r - (ar[:, None] * ac[None, :]) * b
    ars.append(ar), acs.append(ac), bs.append(b)
  return jnp.stack(ars), jnp.stack(acs), jnp.stack(bs)


def update_row_scale(wt, b, a_c, e):
  """a_r = argmin_a sum_ij e_ij (Wt_ij - a_i a_c_j B_ij)^2 (+1e-8 ridge):  [r] from Wt, B, e [r, c], a_c [c]."""
  p = a_c[None, :] * b
  return jnp.sum(e * p * wt, axis=1) / (jnp.sum(e * p * p, axis=1) + 1e-8)


def update_col_scale(wt, b, a_r, e):
  """a_c = argmin_a sum_ij e_ij (Wt_ij - a_r_i a_j B_ij)^2 (+1e-8 ridge):  [c] from Wt, B, e [r, c], a_r [r]."""
  q = a_r[:, None] * b
  return jnp.sum(e * q * wt, axis=0) / (jnp.sum(e * q * q, axis=0) + 1e-8)


def rerround(w1, a_r, a_c):
  """Joint re-rounding: B [K, r, c] (±1) minimising |W1 - sum_k s_k a_r^k a_c^k^T| per entry.

  Patterns are visited in index order (index = sum_k [s_k = +1] 2^(K-k)); a strict `<` keeps the lowest index
  on ties, as argmin over the stacked [r, c, 2^K] distances would.
  """
  order = a_r.shape[0]
  cs = [a_r[k][:, None] * a_c[k][None, :] for k in range(order)]
  best_d = best_i = None
  for idx in range(2 ** order):
    v = None
    for k in range(order):
      t = cs[k] if (idx >> (order - 1 - k)) & 1 else -cs[k]
      v = t if v is None else v + t
    dist = jnp.abs(w1 - v)
    if best_d is None:
      best_d, best_i = dist, jnp.zeros(w1.shape, jnp.int32)
    else:
      better = dist < best_d
      best_d = jnp.where(better, dist, best_d)
      best_i = jnp.where(better, idx, best_i)
  one = jnp.ones((), w1.dtype)
  return jnp.stack([jnp.where((best_i >> (order - 1 - k)) & 1 == 1, one, -one) for k in range(order)])


def _dot(a, b):
  return jnp.dot(a, b, precision=_HI)


def _rsr_step(w1, e, ew, a_r, a_c, b, axis_name=None):
  """One RSR iteration (scale updates for k = 1..K, then re-rounding if K >= 2).

  The updates are the closed forms above written with B fixed over the iteration (B_k^2 = 1):
    num(a_r^k) = G_k a_c^k - sum_{l != k} a_r^l ⊙ (N_kl (a_c^k ⊙ a_c^l)),  den = e (a_c^k)^2
    num(a_c^k) = G_k^T a_r^k - sum_{l != k} a_c^l ⊙ (N_kl^T (a_r^k ⊙ a_r^l)),  den = e^T (a_r^k)^2
  with G_k = B_k ⊙ ew (ew = e ⊙ W1) and N_kl = e ⊙ B_k ⊙ B_l, i.e. matrix-vector products instead of rebuilding Wt.
  The a_c sums run over all rows: across the devices of `axis_name` when rows are sharded.
  """
  cols = lambda v: v if axis_name is None else lax.psum(v, axis_name)  # noqa: E731
  order = a_r.shape[0]
  g = [b[k] * ew for k in range(order)]
  nkl = {(k, l): e * b[k] * b[l] for k in range(order) for l in range(k + 1, order)}
  pair = lambda k, l: nkl[(min(k, l), max(k, l))]
  for k in range(order):
    num = _dot(g[k], a_c[k])
    for l in range(order):
      if l != k:
        num = num - a_r[l] * _dot(pair(k, l), a_c[k] * a_c[l])
    ar_k = num / (_dot(e, a_c[k] * a_c[k]) + 1e-8)
    a_r = a_r.at[k].set(ar_k)
    num = cols(_dot(ar_k, g[k]))
    for l in range(order):
      if l != k:
        num = num - a_c[l] * cols(_dot(ar_k * a_r[l], pair(k, l)))
    a_c = a_c.at[k].set(num / (cols(_dot(ar_k * ar_k, e)) + 1e-8))
  if order >= 2:
    b = rerround(w1, a_r, a_c)
  return a_r, a_c, b


def round_signed(x, scale_dtype):
  """Round a (possibly negative) scale to scale_dtype and back (None: unchanged)."""
  if scale_dtype is None:
    return x
  return x.astype(jnp.dtype(scale_dtype)).astype(x.dtype)


def daq_block(w1, e, order: int, iters: int = 15, rsr_tol=None, scale_dtype=None, axis_name=None):
  """DAQ on one block (static order). w1, e [r, c] -> (w_hat [r, c], a_r [K, r], a_c [K, c], B bool [K, r, c]).

  rsr_tol: stop early once the relative decrease of sum e (W1 - W^)^2 over one iteration is below it.
  scale_dtype: storage dtype of the returned scales (None: unrounded); w_hat uses the returned scales.
  axis_name: the mesh axis the rows are sharded over (inside shard_map), or None.
  """
  a_r, a_c, b = greedy_init(w1, order, axis_name)
  ew = e * w1
  if rsr_tol is None:
    a_r, a_c, b = lax.fori_loop(0, iters, lambda _, s: _rsr_step(w1, e, ew, *s, axis_name), (a_r, a_c, b))
  else:
    def obj(s):
      res = w1 - plane_sum(s[0], s[1], s[2] > 0)
      return _all_sum(e * res * res, axis_name)

    def cond(st):
      i, s, prev, cur = st
      return (i < iters) & ((i < 1) | (prev - cur > rsr_tol * prev))

    def body(st):
      i, s, _, cur = st
      s = _rsr_step(w1, e, ew, *s, axis_name)
      return i + 1, s, cur, obj(s)

    init = (a_r, a_c, b)
    _, (a_r, a_c, b), _, _ = lax.while_loop(cond, body, (0, init, jnp.inf, obj(init)))
  a_r = round_signed(a_r, scale_dtype)
  a_c = round_signed(a_c, scale_dtype)
  signs = b > 0
  return plane_sum(a_r, a_c, signs), a_r, a_c, signs


def daq_quantize(w, u, orders, *, block: int = 128, iters: int = 15, outlier_z: float = 2.0,
                 salient_weight: float = 3.0, dor: bool = True, z_diag: str = "chol", compensation: bool = True,
                 scale_dtype="float16", rsr_tol=None, comp_mode: str = "diag", axis_name=None):
  """DAQ + cross-block compensation on one matrix, with a per-block order.

  Args:
    w: float32 [out, in] (dead columns zeroed), in a multiple of `block` (a multiple of 32).
    u: float32 [in, in], U of `prepare_hessian`.  orders: int [in/block], values in {1, 2, 3}.
  Returns:
    dict(w_hat float [out, in], bits uint32 [nb, 3, out, block/32] (planes beyond a block's order are 0),
         a_r [nb, 3, out], a_c [nb, 3, block] (rounded to scale_dtype, kept in w.dtype; unused planes 0),
         loss = sum_b sum E_b^2 / 2 with E_b the block's compensation error, see the module docstring).
    comp_mode: "diag" (released code, E = delta / d_b) or "block" (exact block OBS, E = delta U_bb^-1).
    axis_name: inside shard_map with w's rows sharded over this mesh axis (quant/row_sharded.py): the sums over
      rows (column scales, DOR statistics) are reduced across it; the returned loss is this shard's part.
  """
  w, u, orders = jnp.asarray(w), jnp.asarray(u), jnp.asarray(orders, jnp.int32)
  n = w.shape[1]
  if comp_mode not in ("diag", "block"):
    raise QuantizationError(f"comp_mode={comp_mode!r}; expected 'diag' (released code) or 'block' (exact OBS)")
  if block % 32 or n % block or u.shape != (n, n) or orders.shape != (n // block,):
    raise QuantizationError(f"daq_quantize: w {w.shape}, u {u.shape}, orders {orders.shape}, block {block}; "
                            f"expected u [in, in], block a multiple of 32 dividing in, orders [in / block].")
  return _daq_quantize(
      w, u, orders, block=int(block), iters=int(iters),
      outlier_z=float(outlier_z), salient_weight=float(salient_weight), dor=bool(dor), z_diag=str(z_diag),
      compensation=bool(compensation), scale_dtype=None if scale_dtype is None else jnp.dtype(scale_dtype).name,
      rsr_tol=None if rsr_tol is None else float(rsr_tol), comp_mode=comp_mode, axis_name=axis_name)


@functools.partial(jax.jit, static_argnames=(
    "block", "iters", "outlier_z", "salient_weight", "dor", "z_diag", "compensation", "scale_dtype", "rsr_tol",
    "comp_mode", "axis_name"))
def _daq_quantize(w, u, orders, *, block, iters, outlier_z, salient_weight, dor, z_diag, compensation,
                  scale_dtype, rsr_tol, comp_mode, axis_name):
  out, n = w.shape
  nb = n // block
  dt = w.dtype
  du = jnp.diagonal(u)
  dz = du if z_diag == "chol" else jnp.sqrt(jnp.sum(u * u, axis=0))

  def solve(k, w1, e):
    wh, a_r, a_c, signs = daq_block(w1, e, k, iters, rsr_tol, scale_dtype, axis_name)
    pad = MAX_ORDER - k
    bits = jnp.concatenate([pack_signs(signs), jnp.zeros((pad, out, block // 32), jnp.uint32)])
    a_r = jnp.concatenate([a_r, jnp.zeros((pad, out), dt)])
    a_c = jnp.concatenate([a_c, jnp.zeros((pad, block), dt)])
    return wh, bits, a_r, a_c

  branches = [functools.partial(solve, k) for k in range(1, MAX_ORDER + 1)]

  def block_fn(b, w1t, ws, j, carry):
    w1 = w1t.T
    db = lax.dynamic_slice_in_dim(du, b * block, block)
    e = salience_weights(w1, lax.dynamic_slice_in_dim(dz, b * block, block), outlier_z, salient_weight,
                         axis_name) if dor else jnp.ones_like(w1)
    wh, bits, a_r, a_c = lax.switch(orders[b] - 1, branches, w1, e)
    if comp_mode == "block":  # E = delta U_bb^-1, i.e. E U_bb = delta: U_bb^T E^T = delta^T (lower triangular)
      ubb = lax.dynamic_slice(u, (b * block, b * block), (block, block))
      err = jax.scipy.linalg.solve_triangular(ubb.T, (w1 - wh).T, lower=True).T
    else:
      err = (w1 - wh) / db[None, :]
    return err.T, (wh, bits, a_r, a_c, jnp.sum(err * err)), carry

  m = superblock_size(nb)
  (wh, bits, a_r, a_c, loss), _ = obc_sweep(w.T, u, block_fn, (), block=block, m=m, compensate=compensation)
  w_hat = wh.transpose(1, 0, 2).reshape(out, n)
  return dict(w_hat=w_hat, bits=bits, a_r=a_r, a_c=a_c, loss=jnp.sum(loss) / 2)


__all__ = [
    "MAX_ORDER", "sgn", "salience_weights", "greedy_init", "update_row_scale", "update_col_scale",
    "rerround", "round_signed", "daq_block", "daq_quantize",
]
