"""ABMP: adaptive blockwise mixed precision (orders 1/2/3 per 128-column block), Quant-dLLM §5.

Per matrix (released `utils/abmp.allocate_block_orders`):
    sal[b] = sum_{i, j in b} W_ij^2 / U_jj^2                  on the original (pre-compensation) W
    r = min(floor(nb * ratio), floor(nb / 2)); stable ascending sort of sal;
    lowest r blocks -> order 1, highest r -> order 3, the rest -> 2  (mean order exactly 2).

Global variant (`allocate_orders_global`), one budget over several matrices (documented rule):
  * every block of matrix m (r_m rows, `block` columns) costs  K * plane_bits(m) + order_bits  bits at order K,
    plane_bits(m) = r_m * block + (r_m + block) * scale_bits + index_bits  (a sign plane, its a_r and a_c
    scales and its int32 plane_block entry), order_bits = 8 (the int8 order), so the achieved bits equal the
    packed weights' `bits_per_weight` exactly;
  * the budget is  target_bits * W_total  if target_bits is given, else the cost of all blocks at order 2;
  * blocks are ranked by the key (salience, matrix name, block index) ascending (ties broken by name, index);
  * start at order 2; if `ratio` is given, demote the lowest r = min(floor(N ratio), floor(N / 2)) blocks of the
    N in the pool to order 1; while the total exceeds the budget, demote further blocks in ascending order;
  * then walk the blocks from the highest key down and promote each order-2 block to 3 if its plane_bits still
    fit in the remaining budget (blocks that do not fit are skipped, smaller ones later may still fit).
  The result never exceeds the budget. When all matrices share a row count (one plane cost), every demotion
  pays for exactly one promotion: with `ratio` alone the target (true bits of uniform order 2) is hit exactly
  and the rule equals the per-matrix rule applied to the pooled ranking. With mixed row counts the shortfall
  is below the plane cost of the cheapest block left at order 2; `achieved_bits` reports it.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import QuantizationError


@functools.partial(jax.jit, static_argnames=("block",))
def _block_sums(w, d, block):
  out, n = w.shape
  return jnp.sum((w * w / (d * d)[None, :]).reshape(out, n // block, block), axis=(0, 2))


def block_salience(w, u, block: int = 128):
  """sal[b] = sum_{i, j in block b} W_ij^2 / U_jj^2.  w [out, in], u [in, in] (or diag(U) [in]) -> float64 [nb]."""
  w = jnp.asarray(w, jnp.float32)
  u = jnp.asarray(u, jnp.float32)
  d = jnp.diagonal(u) if u.ndim == 2 else u
  if w.shape[1] % block:
    raise QuantizationError(f"block_salience: in_features={w.shape[1]} is not a multiple of the block size "
                            f"{block}; use a block size that divides it.")
  return np.asarray(_block_sums(w, d, block), np.float64)


def num_extreme_blocks(nb: int, ratio: float) -> int:
  """r = min(floor(nb * ratio), floor(nb / 2)) (python float arithmetic, as the released code)."""
  if not 0.0 <= ratio <= 1.0:
    raise QuantizationError(f"abmp ratio={ratio} must lie in [0, 1] (0.05 LLaDA, 0.10 Dream).")
  return min(int(math.floor(nb * ratio)), nb // 2)


def allocate_orders(salience, ratio: float, base: int = 2):
  """Per-matrix ABMP orders int8 [nb]: lowest r blocks -> base-1, highest r -> base+1, others base."""
  sal = np.asarray(salience, np.float64)
  nb = sal.size
  r = num_extreme_blocks(nb, ratio)
  orders = np.full(nb, base, np.int8)
  if r > 0:
    idx = np.argsort(sal, kind="stable")
    orders[idx[:r]] = base - 1
    orders[idx[nb - r:]] = base + 1
  return orders


def plane_bits(rows: int, block: int = 128, scale_bits: int = 16, index_bits: int = 32) -> int:
  """Stored bits of one sign plane: rows * block signs + (rows + block) * scale_bits + its plane_block index."""
  return rows * block + (rows + block) * scale_bits + index_bits


def allocate_orders_global(saliences: dict, rows: dict, *, ratio=None, target_bits=None, block: int = 128,
                           scale_bits: int = 16, order_bits: int = 8, index_bits: int = 32):
  """Global ABMP over several matrices under one true-bits budget (rule in the module doc).

  Args:
    saliences: {name: float [nb_m]} block saliences; rows: {name: out features r_m}.
    ratio: fraction of the pooled blocks demoted to order 1 (and, budget permitting, promoted to 3).
    target_bits: true bits per weight (planes + scales + orders) of the whole pool; None = uniform order 2.
  Returns:
    ({name: int8 orders [nb_m]}, achieved_bits) with achieved_bits = total bits / total weights <= target.
  """
  if ratio is None and target_bits is None:
    raise QuantizationError("allocate_orders_global needs ratio or target_bits (or both).")
  names = sorted(saliences)
  if set(names) != set(rows):
    raise QuantizationError(f"allocate_orders_global: saliences {names} and rows {sorted(rows)} differ.")
  keys, cost = [], {}
  weights = 0
  for nm in names:
    sal = np.asarray(saliences[nm], np.float64)
    cost[nm] = plane_bits(int(rows[nm]), block, scale_bits, index_bits)
    weights += int(rows[nm]) * block * sal.size
    keys += [(float(s), nm, b) for b, s in enumerate(sal)]
  keys.sort()
  orders = {nm: np.full(np.asarray(saliences[nm]).size, 2, np.int8) for nm in names}
  total = sum(2 * cost[nm] + order_bits for _, nm, _ in keys)
  budget = total if target_bits is None else int(math.floor(float(target_bits) * weights))
  r = 0 if ratio is None else num_extreme_blocks(len(keys), float(ratio))
  pos = 0
  while pos < len(keys) and (pos < r or total > budget):
    _, nm, b = keys[pos]
    orders[nm][b] = 1
    total -= cost[nm]
    pos += 1
  if total > budget:
    raise QuantizationError(f"target_bits={target_bits} is below the cost of order 1 everywhere "
                            f"({total / weights:.4f} bits/weight).")
  for _, nm, b in reversed(keys):
    if orders[nm][b] == 2 and total + cost[nm] <= budget:
      orders[nm][b] = 3
      total += cost[nm]
  return orders, total / weights


__all__ = ["block_salience", "num_extreme_blocks", "allocate_orders", "plane_bits", "allocate_orders_global"]
