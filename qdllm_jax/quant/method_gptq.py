"""GPTQ (arXiv 2210.17323) as the dLLM papers run it: asymmetric min/max groups, damping 0.01, optional
act-order; matrices sharing one H share one damping and Cholesky, same-shape ones are solved under vmap."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.quant import packed, row_sharded
from qdllm_jax.quant.gptq import gptq_quantize, upper_inverse
from qdllm_jax.quant.hessian import prepare_hessian
from qdllm_jax.quant.method_rtn import check_uniform_shape, uniform_bytes
from qdllm_jax.quant.method_spec import COMMON_OPTIONS, QuantMethod, check_damping
from qdllm_jax.quant.rtn import find_params

LAZY_BLOCK = 128  # columns per lazy batch update; a group must tile it or be tiled by it


def check_shape(bits, group_size, n_in) -> tuple[str, str] | None:
  """RTN's checks, and a group size that divides 128 or is a multiple of it (the lazy block), or -1."""
  why = check_uniform_shape(bits, group_size, n_in, "gptq")
  if why is None and group_size != -1 and not (LAZY_BLOCK % group_size == 0 or group_size % LAZY_BLOCK == 0):
    why = "group_size", f"a size that must divide {LAZY_BLOCK} or be a multiple of it (the lazy block), or -1"
  return why


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "scale_dtype", "per_channel"))
def _gptq_batch(w, v, cs, cz, *, bits, group_size, sym, scale_dtype, per_channel):
  """vmap of gptq_quantize over a stack of same-shape matrices sharing V (H + delta I = V V^T)."""
  f = lambda w, cs, cz: gptq_quantize(w, None, cs if per_channel else None, cz if per_channel else None, v=v,
                                      bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype)
  return jax.vmap(f)(w, cs, cz)


@jax.jit
def _sq_dist(a, b):
  """||a - b||_F^2 (float32 scalar) of two [out, in] matrices."""
  return jnp.sum(jnp.square(a - b))


def solve(ws, h, bits, group_size, abmp_ratio, opt):
  """[(QuantizedWeight, w_hat float32 [out, in], info)] for matrices sharing H (abmp_ratio unused)."""
  del abmp_ratio
  sd, sym = opt["scale_dtype"], opt["sym"]
  n = ws[0].shape[1]
  perm = inv = None
  hj = h
  if opt["act_order"]:
    dg = np.asarray(jnp.diagonal(h), np.float64)
    perm = np.argsort(-np.where(dg == 0, 1.0, dg), kind="stable")
    inv = np.argsort(perm)
    hj = h[perm][:, perm]
  ph = prepare_hessian(ws[0] if perm is None else ws[0][:, perm], hj, opt["percdamp"], opt["max_percdamp"],
                       factor="cholesky")  # GPTQ needs no inverse (gptq.py)
  per_channel = group_size == -1
  prep = lambda w: jnp.where(ph.dead[None, :], 0.0, w if perm is None else w[:, perm])
  by_out = {}
  for i, w in enumerate(ws):
    by_out.setdefault(w.shape[0], []).append(i)
  outs = [None] * len(ws)
  rs = opt["row_sharding"]
  for _, idx in by_out.items():
    if rs is not None and row_sharded.can_shard(ws[idx[0]].shape[0], *rs):  # solve each over the row shards
      for i in idx:
        cs, cz = find_params(ws[i], bits, sym, sd) if per_channel else (None, None)
        outs[i] = row_sharded.gptq_rows(prep(ws[i]), upper_inverse(ph.v), cs, cz, mesh=rs[0], axis=rs[1], bits=bits,
                                        group_size=group_size, sym=sym, scale_dtype=sd)
      continue
    if len(idx) == 1:  # no vmap for a single matrix
      w = ws[idx[0]]
      cs, cz = find_params(w, bits, sym, sd) if per_channel else (None, None)  # from the unfixed w
      outs[idx[0]] = gptq_quantize(prep(w), None, cs, cz, v=ph.v, bits=bits, group_size=group_size, sym=sym,
                                   scale_dtype=sd)
      continue
    wo = jnp.stack([ws[i] for i in idx])
    cs, cz = find_params(wo, bits, sym, sd)
    r = _gptq_batch(jax.vmap(prep)(wo), ph.v, cs, cz, bits=bits, group_size=group_size, sym=sym,
                    scale_dtype=sd, per_channel=per_channel)
    for j, i in enumerate(idx):
      outs[i] = jax.tree.map(lambda x: x[j], r)
  results = []
  for w, r in zip(ws, outs):
    # tr(E H E^T) from the solve: with H + delta I = V V^T the scaled errors are e = E V, so
    # tr(E H E^T) = ||e||^2 - delta ||E||^2 = 2 loss - delta ||E||^2 (dead columns: E = 0 there, H's row is 0)
    err_h = 2.0 * r["loss"] - ph.delta * _sq_dist(prep(w), r["w_hat"])
    codes, w_hat, g_idx = r["codes"], r["w_hat"], None
    if perm is not None:
      codes, w_hat = codes[:, inv], w_hat[:, inv]
      g_idx = inv // (n if group_size == -1 else group_size)
    qw = packed.from_uniform(codes, r["scales"], r["zeros"], bits=bits, group_size=group_size, sym=sym,
                             g_idx=g_idx, scale_dtype=sd, method="gptq")
    results.append((qw, w_hat, dict(method="gptq", percdamp=ph.percdamp, delta=ph.delta,
                                    dead_columns=int(jnp.sum(ph.dead)), solver_loss=float(r["loss"]),
                                    layer_loss=float(err_h))))
  return results


def solve_kernel(w, ph, bits, group_size, opt):
  """gptq_quantize once on the prepared ph.w [out, in] with the Cholesky factor ph.v (w itself unused)."""
  del w
  return lambda: gptq_quantize(ph.w, None, v=ph.v, bits=bits, group_size=group_size, sym=bool(opt["sym"]),
                               scale_dtype=opt["scale_dtype"])


METHOD = QuantMethod(
    name="gptq",
    summary="GPTQ, asymmetric min/max groups by default, damp 0.01, optional act-order; bits 2..8",
    needs_hessian=True,
    options={**COMMON_OPTIONS, "sym": False, "act_order": False, "percdamp": 0.01, "max_percdamp": 10.0,
             "row_sharding": None},
    config_keys=("sym", "act_order", "percdamp", "scale_dtype"),
    check_shape=check_shape,
    check_options=check_damping,
    packed_bytes=uniform_bytes,
    solve=solve,
    solve_kernel=solve_kernel,
    hessian_factor="cholesky",
    reports_layer_loss=True,
)
