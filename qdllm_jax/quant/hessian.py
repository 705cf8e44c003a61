"""Layer Hessians in the GPTQ convention and the inverse Cholesky factor U (GPTQ's `Hinv`).

For a linear y = x W^T with W [out, in], calibration inputs give
    H = (2/n) sum_s X_s^T X_s            X_s [tokens, in] of sequence s, n = number of sequences,
and the layer's output error for a quantized W^ is proportional to tr((W - W^) H (W - W^)^T).

`prepare_hessian` applies GPTQ's fixes in the original order:
    dead columns (H_jj == 0):  H_jj <- 1, W[:, j] <- 0
    delta = percdamp * mean(diag H),  U = upper Cholesky factor of (H + delta I)^-1,  (H + delta I)^-1 = U^T U.
If (H + delta I) is not numerically positive definite (NaN in U), percdamp is multiplied by 10 and the
factorisation retried, up to `max_percdamp`; the damping actually used is returned so the caller can log it.

U is computed as J inv(chol(J Hd J)) J (J = row reversal): J Hd J = L L^T gives Hd = R R^T with
R = J L J upper triangular, so Hd^-1 = R^-T R^-1 and U = R^-1 = J L^-1 J. This is one Cholesky and one
triangular inverse instead of GPTQ's chol -> cholesky_inverse -> chol, and equals it up to float rounding.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qdllm_jax.errors import QuantizationError

_HI = jax.lax.Precision.HIGHEST


class PreparedHessian(NamedTuple):
  """Result of `prepare_hessian`.

  w: float32 [out, in], the weight with dead columns zeroed.
  u: float32 [in, in], upper triangular, (H + delta I)^-1 = u^T u.
  percdamp: float, the damping fraction actually used (>= the requested one after escalation).
  delta: float, percdamp * mean(diag H) (H after the dead-column fix).
  dead: bool [in], the dead columns (H_jj == 0).
  v: float32 [in, in] upper triangular with H + delta I = v v^T (v = u^-1), only with factor="cholesky" (u is
    then None: GPTQ needs no inverse, see gptq.py).
  """
  w: jax.Array
  u: jax.Array | None
  percdamp: float
  delta: float
  dead: jax.Array
  v: jax.Array | None = None


def hessian_update(h, n, x):
  """Running GPTQ Hessian: H <- H n/(n+m) + (2/(n+m)) sum_s X_s^T X_s, n <- n + m.

  Args:
    h: float32 [in, in], the current Hessian (zeros when n == 0).
    n: int, number of sequences already accumulated (python int or int32 scalar).
    x: [tokens, in] (one sequence, m = 1) or [m, tokens, in] (m sequences), any float dtype.
  Returns:
    (h float32 [in, in], n + m).
  """
  x = jnp.asarray(x)
  m = 1 if x.ndim == 2 else x.shape[0]
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  nf = jnp.asarray(n, jnp.float32)
  tot = nf + m
  xtx = jnp.matmul(x2.T, x2, precision=_HI)
  return h * (nf / tot) + (2.0 / tot) * xtx, n + m


def _fix_dead_h(h, percdamp=None):
  """(h with H_jj = 1 where H_jj == 0, plus delta = percdamp * mean(fixed diagonal) on its diagonal when percdamp
  is given (the damping, in the same pass over H; delta 0 otherwise), delta, dead bool [in])."""
  d = jnp.diagonal(h)
  dead = d == 0
  d = jnp.where(dead, jnp.ones((), h.dtype), d)
  delta = jnp.zeros((), h.dtype) if percdamp is None else percdamp * jnp.mean(d)
  idx = jnp.arange(h.shape[0])
  return h.at[idx, idx].set(d + delta), delta, dead


def _zero_dead(w, dead):
  return jnp.where(dead[None, :], jnp.zeros((), w.dtype), w)


def fix_dead_columns(w, h):
  """GPTQ's dead-column fix: where H_jj == 0 set H_jj = 1 and W[:, j] = 0.

  Args: w float [out, in], h float [in, in]. Returns (w, h, dead bool [in]).
  """
  h, _, dead = _fix_dead_h(h)
  return _zero_dead(w, dead), h, dead


def tri_inv_lower(l, base: int = 512):
  """L^-1 of a lower triangular l [n, n] by recursive 2x2 blocking (inv([[A, 0], [B, C]]) =
  [[A^-1, 0], [-C^-1 B A^-1, C^-1]]): 2/3 n^3 flops in large matmuls instead of an n^3 triangular solve."""
  n = l.shape[0]
  if n <= base:
    return jax.scipy.linalg.solve_triangular(l, jnp.eye(n, dtype=l.dtype), lower=True)
  h = n // 2
  a = tri_inv_lower(l[:h, :h], base)
  c = tri_inv_lower(l[h:, h:], base)
  b = -jnp.matmul(c, jnp.matmul(l[h:, :h], a, precision=_HI), precision=_HI)
  top = jnp.concatenate([a, jnp.zeros((h, n - h), l.dtype)], axis=1)
  return jnp.concatenate([top, jnp.concatenate([b, c], axis=1)], axis=0)


def cholesky_lower(a, block: int = 256):
  """L lower triangular with a = L L^T (a symmetric positive definite [n, n]; NaN from the first block that is
  not PD on). Left-looking blocked: for each `block`-column panel P = a[k:, K] - L[k:, :k] L[K, :k]^T (one
  matmul), L_KK = chol(P_K) and L[K', K] = P_K' L_KK^-T. The n^3 / 3 flops run in matmuls, which XLA:CPU
  executes ~1.4x faster than LAPACK's potrf at n = 4096 (quant/hessian benchmark in docs/benchmarks.md); on
  TPU/GPU the products are as native as the library call. Static slices: one traced step per panel."""
  n = a.shape[0]
  if n <= 2 * block:
    return jnp.linalg.cholesky(a)
  lo = jnp.zeros_like(a)
  for k0 in range(0, n, block):
    k1 = min(k0 + block, n)
    panel = a[k0:, k0:k1]
    if k0:
      panel = panel - jnp.matmul(lo[k0:, :k0], lo[k0:k1, :k0].T, precision=_HI)
    lkk = jnp.linalg.cholesky(panel[:k1 - k0])
    if k1 < n:
      below = jax.scipy.linalg.solve_triangular(lkk, panel[k1 - k0:].T, lower=True).T
      lkk = jnp.concatenate([lkk, below], 0)
    lo = lo.at[k0:, k0:k1].set(lkk)
  return lo


def chol_inverse_upper(hd):
  """U upper triangular with hd^-1 = U^T U (hd symmetric positive definite [n, n]); NaN if not PD."""
  lr = cholesky_lower(hd[::-1, ::-1])
  return jnp.triu(tri_inv_lower(lr)[::-1, ::-1])


def chol_upper(hd):
  """V upper triangular with hd = V V^T (hd symmetric positive definite [n, n]): V = J chol(J hd J) J; NaN if
  not PD. V^-1 = chol_inverse_upper(hd)."""
  return jnp.triu(cholesky_lower(hd[::-1, ::-1])[::-1, ::-1])


@functools.partial(jax.jit, static_argnames=("inverse",))
def _damped_u(h, percdamp, inverse=True):
  """fix_dead_columns on H (inside the jit: no fixed copy of H outlives it), then U of H + delta I (or V = U^-1
  with inverse=False): (u or v, delta, all finite, dead)."""
  hd, delta, dead = _fix_dead_h(h, percdamp)  # the dead-column fix and the damping in one pass
  u = chol_inverse_upper(hd) if inverse else chol_upper(hd)
  return u, delta, jnp.all(jnp.isfinite(u)), dead


_zero_dead_jit = jax.jit(_zero_dead)


def prepare_hessian(w, h, percdamp: float = 0.01, max_percdamp: float = 10.0,
                    factor: str = "inverse") -> PreparedHessian:
  """Dead-column fix, damping with automatic escalation, and U = chol_upper((H + delta I)^-1).

  Args:
    w: float [out, in] weight (PyTorch layout).
    h: float [in, in] Hessian, H = (2/n) sum X^T X.
    percdamp: damping fraction of mean(diag H) (GPTQ default 0.01).
    max_percdamp: the largest damping fraction tried; percdamp is multiplied by 10 on each failure.
    factor: "inverse" (u = chol_upper((H + delta I)^-1)) or "cholesky" (v with H + delta I = v v^T, u None;
      half the flops: no triangular inverse).
  Returns:
    PreparedHessian(w, u, percdamp_used, delta, dead); arrays keep the dtype of `h` (float32 in practice).
  Raises:
    QuantizationError if the damped Hessian is still not positive definite at max_percdamp.
  """
  if factor not in ("inverse", "cholesky"):
    raise QuantizationError(f"prepare_hessian: factor={factor!r}; expected 'inverse' or 'cholesky'.")
  w = jnp.asarray(w)
  h = jnp.asarray(h)
  p = float(percdamp)
  tried = []
  while True:
    # the dead-column fix is fused into the factorisation (no fixed copy of H stays alive beside it)
    f, delta, ok, dead = _damped_u(h, jnp.asarray(p, h.dtype), inverse=factor != "cholesky")
    tried.append(p)
    if bool(ok):
      u, v = (None, f) if factor == "cholesky" else (f, None)
      return PreparedHessian(_zero_dead_jit(w, dead), u, p, float(delta), dead, v)
    if p * 10.0 > max_percdamp * (1 + 1e-9):
      raise QuantizationError(
          f"Hessian is not positive definite even with damping percdamp={tried} (x mean diag H); "
          f"expected a symmetric PSD H = (2/n) sum X^T X with finite entries. Check the calibration "
          f"activations for NaN/Inf or raise max_percdamp (now {max_percdamp}).")
    p *= 10.0


@jax.jit
def layer_loss(w, w_hat, h):
  """tr((W - W^) H (W - W^)^T) for W, W^ [out, in] and H [in, in]; float32 scalar."""
  d = (w - w_hat).astype(jnp.float32)
  return jnp.sum(jnp.matmul(d, h.astype(jnp.float32), precision=_HI) * d)


@jax.jit
def layer_errors(w, w_hat, h):
  """(tr(E H E^T), tr(E H E^T) / tr(W H W^T)) with E = W - W^, in one [2 out, in] x [in, in] product of [E; W];
  float32 scalars. One product, not two: XLA:CPU ran two independent
  products in one program ~3x slower than the same flops as one (4096 x 4096: 9.4-11.9 s against 3.1-3.6 s,
  docs/benchmarks.md), and for RTN these diagnostics are most of a block's time."""
  w32 = w.astype(jnp.float32)
  x = jnp.concatenate([w32 - w_hat.astype(jnp.float32), w32], axis=0)
  t = jnp.sum((jnp.matmul(x, h.astype(jnp.float32), precision=_HI) * x).reshape(2, w.shape[0], -1), axis=(1, 2))
  return t[0], t[0] / t[1]


@jax.jit
def output_energy(w, h):
  """tr(W H W^T) for W [out, in], H [in, in] (the denominator of the relative output error); float32 scalar."""
  w32 = w.astype(jnp.float32)
  return jnp.sum(jnp.matmul(w32, h.astype(jnp.float32), precision=_HI) * w32)


@jax.jit
def relative_sq_output_error(w, w_hat, h):
  """tr((W - W^) H (W - W^)^T) / tr(W H W^T): the relative squared output error on the calibration set."""
  return layer_errors(w, w_hat, h)[1]


__all__ = [
    "PreparedHessian", "hessian_update", "fix_dead_columns", "tri_inv_lower", "chol_upper", "chol_inverse_upper",
    "prepare_hessian",
    "layer_loss", "relative_sq_output_error", "layer_errors", "output_energy",
]
