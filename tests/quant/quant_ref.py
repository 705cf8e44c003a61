"""Independent float64 NumPy transcriptions of the reference algorithms (GPTQ, RTN, DAQ, compensation).

Written from the papers (arXiv 2510.03274 DAQ/ABMP and its released code, arXiv 2508.14896), deliberately in the
direct, unoptimised form of the original code: column-by-column GPTQ with full rank-1 updates, DAQ with Wt
rebuilt for every update and the released (e-weighted) argmin over the stacked [r, c, 2^K] distances.
"""
import itertools

import jax
import numpy as np


def x64():
  """Context manager enabling float64 in JAX (jax.enable_x64 on new jax, jax.experimental on old)."""
  ctx = getattr(jax, "enable_x64", None)
  if ctx is not None:
    return ctx(True)
  from jax.experimental import enable_x64  # pragma: no cover
  return enable_x64()


def random_layer(out, n, seed=0, tokens=None, outliers=2):
  """W [out, n] float32 and H = (2/T) X^T X float32 from correlated X with a few outlier channels."""
  rng = np.random.default_rng(seed)
  t = tokens or 3 * n
  mix = np.eye(n) + 0.3 * rng.standard_normal((n, n)) / np.sqrt(n)
  x = rng.standard_normal((t, n)) @ mix
  x[:, rng.choice(n, outliers, replace=False)] *= 10.0
  h = (2.0 / t) * x.T @ x
  w = 0.02 * rng.standard_normal((out, n))
  return w.astype(np.float32), h.astype(np.float32)


def inverse_upper(h, percdamp=0.01):
  """GPTQ's Hinv: upper Cholesky factor of (H + percdamp mean(diag H) I)^-1, dead columns fixed first."""
  h = np.array(h, np.float64)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  hd = h + percdamp * np.mean(np.diag(h)) * np.eye(h.shape[0])
  return np.linalg.cholesky(np.linalg.inv(hd)).T


def find_params(x, bits, sym, scale_dtype=None):
  """GPTQ Quantizer.find_params(weight=True) on rows of x [rows, n]."""
  maxq = 2 ** bits - 1
  xmin = np.minimum(x.min(1), 0)
  xmax = np.maximum(x.max(1), 0)
  if sym:
    xmax = np.maximum(np.abs(xmin), xmax)
    xmin = np.where(xmin < 0, -xmax, xmin)
  both = (xmin == 0) & (xmax == 0)
  xmin = np.where(both, -1.0, xmin)
  xmax = np.where(both, 1.0, xmax)
  scale = (xmax - xmin) / maxq
  if scale_dtype is not None:
    scale = scale.astype(scale_dtype).astype(x.dtype)
  zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
  return scale, zero


def rtn(w, bits, g, sym, scale_dtype=None):
  """Closed-form RTN: per (row, group) params; returns codes, scales [out, G], zeros, w_hat."""
  out, n = w.shape
  g = n if g == -1 else g
  codes = np.zeros(w.shape, np.int64)
  scs, zrs = [], []
  for s in range(0, n, g):
    sc, zr = find_params(w[:, s:s + g], bits, sym, scale_dtype)
    codes[:, s:s + g] = np.clip(np.round(w[:, s:s + g] / sc[:, None]) + zr[:, None], 0, 2 ** bits - 1)
    scs.append(sc), zrs.append(zr)
  sc, zr = np.stack(scs, 1), np.stack(zrs, 1)
  gi = np.arange(n) // g
  return codes, sc, zr, sc[:, gi] * (codes - zr[:, gi])


def is_tie(r, tol=1e-9):
  """Entries of the quotient x / scale that sit on a rounding tie (k + 1/2) up to a relative tol."""
  return np.abs(np.abs(r - np.floor(r)) - 0.5) <= tol * np.maximum(1.0, np.abs(r))


def gptq(w, u, bits, g, sym, chan=None, lazy=128, follow=None, tie_tol=1e-9):
  """Original GPTQ column by column (every column's error applied to all later columns at once).

  Group parameters come from a snapshot of W taken every `lazy` columns, which is what the original's
  `find_params(W[:, c:c+g])` sees inside a lazy block of 128 (W is only updated between lazy blocks).
  follow: codes [out, in] of the implementation under test. Where x / scale is an exact rounding tie (the
  symmetric grid puts each group's extreme weight at -maxq/2) the tie may be broken either way by float
  rounding of scale or of the division; there the reference adopts `follow` and carries on. Returns
  (codes, scales, zeros, w_hat, loss, n_mismatch_outside_ties).
  """
  w = np.array(w, np.float64)
  out, n = w.shape
  maxq = 2 ** bits - 1
  codes = np.zeros(w.shape, np.int64)
  q_all = np.zeros_like(w)
  scs, zrs = [], []
  if g == -1:
    sc, zr = chan if chan is not None else find_params(w, bits, sym)
    scs.append(sc), zrs.append(zr)
  loss, bad = 0.0, 0
  for c in range(n):
    if c % lazy == 0:
      snap = w.copy()
    if g != -1 and c % g == 0:
      sc, zr = find_params(snap[:, c:c + g], bits, sym)
      scs.append(sc), zrs.append(zr)
    col = w[:, c]
    r = col / sc
    q = np.clip(np.round(r) + zr, 0, maxq)
    if follow is not None:
      tie = is_tie(r, tie_tol)
      bad += int(np.sum((q != follow[:, c]) & ~tie))
      q = np.where(tie, follow[:, c], q)
    codes[:, c] = q
    q_all[:, c] = sc * (q - zr)
    err = (col - q_all[:, c]) / u[c, c]
    loss += np.sum(err ** 2)
    w[:, c:] -= np.outer(err, u[c, c:])
  return codes, np.stack(scs, 1), np.stack(zrs, 1), q_all, loss / 2, bad


def salience(w1, d, tau=2.0, lam=3.0):
  """Released `saliency_mask_from_hessian` -> e."""
  z_ = w1 ** 2 / (d[None, :] ** 2 + 1e-12)
  z = (z_ - z_.mean()) / (z_.std(ddof=1) + 1e-12)
  o = np.abs(z) > tau
  sal = (z_ >= z_[o].min()) if o.any() else np.zeros_like(o)
  return np.where(sal, lam, 1.0)


def patterns(k):
  """Sign patterns in index order: index = sum_k [s_k = +1] 2^(K-k)."""
  return [tuple(1.0 if (idx >> (k - 1 - j)) & 1 else -1.0 for j in range(k)) for idx in range(2 ** k)]


def daq_block(w1, e, order, iters=15):
  """Released per-block ARB-RC with salience weights (arXiv 2510.03274, binary_arb.py), np.sign (sign(0) = 0)."""
  r = w1.copy()
  ar, ac, bs = [], [], []
  for _ in range(order):
    a_r = np.abs(r).mean(1)
    a_c = (np.abs(r) / (a_r[:, None] + 1e-12)).mean(0)
    b = np.sign(r)
    r = r - np.outer(a_r, a_c) * b
    ar.append(a_r), ac.append(a_c), bs.append(b)
  for _ in range(iters):
    for k in range(order):
      wt = w1 - sum((np.outer(ar[l], ac[l]) * bs[l] for l in range(order) if l != k), np.zeros_like(w1))
      p = ac[k][None, :] * bs[k]
      ar[k] = (e * p * wt).sum(1) / ((e * p * p).sum(1) + 1e-8)
      q = ar[k][:, None] * bs[k]
      ac[k] = (e * q * wt).sum(0) / ((e * q * q).sum(0) + 1e-8)
    if order >= 2:
      cs = [np.outer(ar[k], ac[k]) for k in range(order)]
      v = np.stack([sum(s[k] * cs[k] for k in range(order)) for s in patterns(order)], -1)
      idx = np.argmin(np.abs(w1[..., None] - v) * e[..., None], axis=-1)
      bs = [np.where((idx >> (order - 1 - k)) & 1 == 1, 1.0, -1.0) for k in range(order)]
  w_hat = sum(np.outer(ar[k], ac[k]) * bs[k] for k in range(order))
  return w_hat, np.stack(ar), np.stack(ac), np.stack(bs)


def daq_quantize(w, u, orders, iters=15, compensation=True, dor=True, tau=2.0, lam=3.0, z_diag="chol",
                 block=128):
  """`BRAGPTQ.fasterquant` loop: blocks left to right, DAQ, E = (W1 - Q1)/d, W[:, >b] -= E U[b, >b]."""
  w = np.array(w, np.float64)
  du = np.diag(u)
  dz = du if z_diag == "chol" else np.sqrt((u ** 2).sum(0))
  q_all = np.zeros_like(w)
  loss = 0.0
  for b, k in enumerate(orders):
    sl = slice(b * block, (b + 1) * block)
    w1 = w[:, sl].copy()
    e = salience(w1, dz[sl], tau, lam) if dor else np.ones_like(w1)
    q1 = daq_block(w1, e, int(k), iters)[0]
    err = (w1 - q1) / du[sl]
    q_all[:, sl] = q1
    if compensation:
      w[:, sl.stop:] -= err @ u[sl, sl.stop:]
    loss += (err ** 2).sum() / 2
  return q_all, loss


def daq_quantize_obs(w, h, orders, iters=15, block=128):
  """Exact block-OBS compensation computed from inverses, not from U: with R the columns not yet fixed and S the
  leading block of R, fixing S to Q1 changes the rest by  -delta [inv(H_RR)]_SS^-1 [inv(H_RR)]_{S, R minus S}
  (delta = W1 - Q1); no DOR (e = 1)."""
  w = np.array(w, np.float64)
  n = w.shape[1]
  q_all = np.zeros_like(w)
  for b, k in enumerate(orders):
    s0, s1 = b * block, (b + 1) * block
    w1 = w[:, s0:s1].copy()
    q1 = daq_block(w1, np.ones_like(w1), int(k), iters)[0]
    q_all[:, s0:s1] = q1
    if s1 < n:
      hinv = np.linalg.inv(np.asarray(h, np.float64)[s0:, s0:])
      w[:, s1:] -= (w1 - q1) @ np.linalg.solve(hinv[:block, :block], hinv[:block, block:])
  return q_all


def rerround_brute(w1, ar, ac):
  """Brute force over all 2^K sign patterns per entry; first (lowest-index) minimum wins."""
  order = ar.shape[0]
  out = np.zeros((order,) + w1.shape)
  for i, j in itertools.product(range(w1.shape[0]), range(w1.shape[1])):
    best, best_s = np.inf, None
    for s in patterns(order):
      dist = abs(w1[i, j] - sum(s[k] * ar[k, i] * ac[k, j] for k in range(order)))
      if dist < best:
        best, best_s = dist, s
    out[:, i, j] = best_s
  return out
