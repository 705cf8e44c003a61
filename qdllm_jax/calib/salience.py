"""Model-wide ABMP: block saliences from a full-precision pass, one global order allocation.

Sequential quantization only knows block b's Hessians when it reaches b, so a global allocation needs
its saliences first. This pass streams the blocks once in full precision:
    x_0 = Embed[ids];  for each block b: H_tap = (2/n) sum_s X_s^T X_s of block_b(x_b) with FP weights,
    sal_m[k] = sum_{i, j in column block k} W_ij^2 / U_jj^2  (U from `prepare_hessian(W, H_tap, percdamp)`,
    dead columns zeroed, exactly as the per-matrix rule);  x_{b+1} = block_b(x_b)  (FP propagation)
then `abmp.allocate_orders_global` assigns orders 1/2/3 over all participating matrices under one exact
true-bits budget (planes + scales + order bytes). The sequential pass then quantizes with these orders
fixed. Differences from the per-matrix rule: H comes from FP-propagated activations with the block's
other linears in FP (the sequential pass would see quantized upstream weights), and blocks compete across
matrices and layers.

Participants: linears whose rule's method mixes orders at its rule's bits (`abmp_bits` in quant/methods.py:
Quant-dLLM at 2 bits); they must share one group_size (the column block) and scale_dtype.
"""
from __future__ import annotations

import logging

import jax.numpy as jnp

from qdllm_jax.calib import capture
from qdllm_jax.errors import ConfigError
from qdllm_jax.models.families import family_of
from qdllm_jax.quant import abmp, hessian, methods

log = logging.getLogger(__name__)
SCALE_BITS = {d: 8 * jnp.dtype(d).itemsize for d in methods.SCALE_DTYPES}  # bits of one stored scale


def participants(plan, cfg) -> dict:
  """{(layer, name): Rule} of the linears that take part in the global allocation (rule bits == the method's
  abmp_bits)."""
  out = {}
  for path, rule in plan.modules.items():
    if rule is not None and methods.get_method(rule.method).abmp_bits == rule.bits:
      out[plan.names[path]] = rule
  if not out:
    mixed = " or ".join(f"method {m.name!r} at bits={m.abmp_bits}" for m in methods.REGISTRY.values()
                        if m.abmp_bits is not None)
    raise ConfigError(f"global ABMP needs linears quantized with {mixed}; the plan has none")
  sizes = {(r.group_size, dict(r.options).get("scale_dtype", "float16")) for r in out.values()}
  if len(sizes) != 1:
    raise ConfigError(f"global ABMP needs one column block and scale dtype for all its matrices; the plan mixes "
                      f"(group_size, scale_dtype) = {sorted(sizes)}")
  return out


def global_orders(source, x0, plan, *, ratio: float | None = 0.05, target_bits: float | None = None,
                  chunk_size: int = 8, key_mask=None):
  """Orders for every participating linear from one FP pass and one global allocation.

  Args:
    source: a reader (`.config`, `.block(i)`), e.g. `pipeline.as_source(model)`.
    x0: [N, L, D] embedded calibration inputs (device or host array).
    plan: a resolved `rules.Plan`.
    ratio: fraction of all pooled blocks demoted to order 1 (and promoted to 3 as the budget allows).
    target_bits: true bits per weight of the pool (planes + scales + orders); None = uniform order 2's.
  Returns:
    ({(layer, name): int8 orders [in / group_size]}, achieved true bits per weight).
  """
  cfg = source.config
  family = family_of(cfg)
  parts = participants(plan, cfg)
  group_size, scale_dtype = next(iter({(r.group_size, dict(r.options).get("scale_dtype", "float16"))
                                       for r in parts.values()}))
  if scale_dtype not in SCALE_BITS:
    raise ConfigError(f"scale_dtype={scale_dtype!r}; expected one of {sorted(SCALE_BITS)}")
  sal, rows = {}, {}
  x = x0
  for b in range(cfg.n_layers):
    p = {k: jnp.asarray(v) for k, v in source.block(b).items()}
    names = [n for n in family.linears if (b, n) in parts]
    taps = tuple(dict.fromkeys(family.tap_of[n] for n in names))
    cap = capture.capture_block(p, x, cfg, taps=taps, chunk_size=chunk_size, key_mask=key_mask,
                                with_outputs=b + 1 < cfg.n_layers)
    for n in names:
      percdamp = dict(parts[(b, n)].options).get("percdamp", 0.01)
      ph = hessian.prepare_hessian(jnp.asarray(p[n], jnp.float32), cap.hessians[family.tap_of[n]], percdamp)
      key = plan.path_of(b, n)
      sal[key] = abmp.block_salience(ph.w, ph.u, group_size)
      rows[key] = int(p[n].shape[0])
    x = cap.outputs
  by_path, achieved = abmp.allocate_orders_global(sal, rows, ratio=ratio, target_bits=target_bits, block=group_size,
                                                  scale_bits=SCALE_BITS[scale_dtype])
  log.info("global ABMP: %d matrices, %.4f true bits/weight", len(by_path), achieved)
  return {plan.names[path]: o for path, o in by_path.items()}, float(achieved)
