"""Quant-dLLM (arXiv 2510.03274): DAQ binary planes with row/column scales, refinement and cross-block GPTQ-style
compensation, with ABMP orders 1/2/3 per column block at 2 bits. `bits` is the mean number of planes."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qdllm_jax.quant import abmp, packed, row_sharded
from qdllm_jax.quant.daq import daq_quantize
from qdllm_jax.quant.hessian import prepare_hessian
from qdllm_jax.quant.method_spec import COMMON_OPTIONS, QuantMethod, check_damping, is_int

MAX_ORDER = 3


def check_shape(bits, group_size, n_in) -> tuple[str, str] | None:
  """bits (mean planes) 1..3; the column block a positive multiple of 32 dividing in_features."""
  if bits not in (1, 2, 3) or isinstance(bits, bool):
    return "bits", "1, 2 or 3 for quant_dllm (binary planes per weight; for 4+ bits use gptq)"
  if not is_int(group_size) or group_size <= 0 or group_size % 32:
    return "group_size", "a positive multiple of 32 for quant_dllm (the DAQ column block; 128 in the paper)"
  if n_in is not None and n_in % group_size:
    return "group_size", f"a multiple of 32 dividing in_features={n_in}"
  return None


def check_options(opt: dict) -> str | None:
  """Ranges of the DAQ options (the explicit `orders` are checked against the shapes by `check_orders`)."""
  if opt["z_diag"] not in ("chol", "inv_diag"):
    return f"z_diag={opt['z_diag']!r} is unknown; expected 'chol' or 'inv_diag'."
  if opt["comp_mode"] not in ("diag", "block"):
    return f"comp_mode={opt['comp_mode']!r} is unknown; expected 'diag' (released code) or 'block'."
  if not is_int(opt["rsr_iters"]) or opt["rsr_iters"] < 0:
    return f"rsr_iters={opt['rsr_iters']!r} must be a non-negative integer (default 15)."
  if opt["rsr_tol"] is not None and not opt["rsr_tol"] >= 0:
    return f"rsr_tol={opt['rsr_tol']!r} must be None or >= 0."
  if opt["salient_weight"] <= 0:
    return f"salient_weight={opt['salient_weight']} must be > 0 (it multiplies squared errors)."
  if opt["outlier_z"] <= 0:
    return f"outlier_z={opt['outlier_z']} must be > 0."
  return check_damping(opt)


def check_orders(opt: dict, group_size: int, n_in: int, n_matrices: int) -> str | None:
  """Explicit `orders`: int [in / group_size] in 1..3 (one per column block), or [n_matrices, in / group_size]
  (one row per matrix sharing the Hessian, e.g. from global ABMP)."""
  if opt.get("orders") is None:
    return None
  o = np.asarray(opt["orders"])
  nb = n_in // group_size
  want = (nb,) if o.ndim < 2 or n_matrices == 1 else (n_matrices, nb)
  if o.shape != want or not np.issubdtype(o.dtype, np.integer) or o.min() < 1 or o.max() > MAX_ORDER:
    return (f"orders must be {nb} integers in 1..{MAX_ORDER} (one per {group_size}-column block"
            + ("; or one such row per matrix" if n_matrices > 1 else "") + f"); got shape {o.shape}, dtype {o.dtype}"
            + (f", range {o.min()}..{o.max()}." if o.size and np.issubdtype(o.dtype, np.number) else "."))
  return None


def planes_bytes(rows: int, cols: int, bits: int, group_size: int, opt: dict) -> int:
  """Exact bytes at a mean order of `bits` (ABMP keeps the mean, so the size of every allocation is this)."""
  return packed.binary_planes_nbytes(rows, cols, bits * (cols // group_size), group_size, opt["scale_dtype"])


def orders_for(i, w, u, bits, group_size, abmp_ratio, opt):
  """Planes per column block of matrix i: the explicit `orders`, ABMP's at 2 bits, else `bits` everywhere."""
  nb = w.shape[1] // group_size
  if opt["orders"] is not None:
    o = np.asarray(opt["orders"], np.int8)
    return o[i] if o.ndim == 2 else o
  if bits == 2 and abmp_ratio > 0:
    return abmp.allocate_orders(abmp.block_salience(w, u, group_size), abmp_ratio)
  return np.full(nb, bits, np.int8)


def solve(ws, h, bits, group_size, abmp_ratio, opt):
  """[(QuantizedWeight, w_hat float32 [out, in], info)] for matrices sharing H, one after the other (their
  orders differ, and `lax.switch` under vmap would run every order branch)."""
  sd = opt["scale_dtype"]
  ph = prepare_hessian(ws[0], h, opt["percdamp"], opt["max_percdamp"])
  kw = dict(block=group_size, iters=int(opt["rsr_iters"]), outlier_z=float(opt["outlier_z"]),
            salient_weight=float(opt["salient_weight"]), dor=bool(opt["dor"]), z_diag=opt["z_diag"],
            compensation=bool(opt["compensation"]), comp_mode=opt["comp_mode"], scale_dtype=sd,
            rsr_tol=None if opt["rsr_tol"] is None else float(opt["rsr_tol"]))
  rs = opt["row_sharding"]
  results = []
  for i, w in enumerate(ws):
    wf = jnp.where(ph.dead[None, :], 0.0, w)
    orders = orders_for(i, wf, ph.u, bits, group_size, abmp_ratio, opt)
    if rs is not None and row_sharded.can_shard(w.shape[0], *rs):
      r = row_sharded.daq_rows(wf, ph.u, jnp.asarray(orders, jnp.int32), mesh=rs[0], axis=rs[1], **kw)
    else:
      r = daq_quantize(wf, ph.u, orders, **kw)
    qw = packed.from_binary_planes(r["bits"], r["a_r"], r["a_c"], orders, shape=w.shape, scale_dtype=sd,
                                   nominal_bits=bits)
    results.append((qw, r["w_hat"], dict(method="quant_dllm", percdamp=ph.percdamp, delta=ph.delta,
                                         dead_columns=int(jnp.sum(ph.dead)), solver_loss=float(r["loss"]),
                                         orders=np.asarray(orders))))
  return results


def solve_kernel(w, ph, bits, group_size, opt):
  """daq_quantize once on the prepared ph.w [out, in] with U = ph.u, every column block at order `bits` (w itself
  unused)."""
  del w
  orders = np.full(ph.w.shape[1] // group_size, bits, np.int8)
  return lambda: daq_quantize(ph.w, ph.u, orders, block=group_size, iters=int(opt["rsr_iters"]),
                              scale_dtype=opt["scale_dtype"])


METHOD = QuantMethod(
    name="quant_dllm",
    summary=("DAQ + cross-block compensation; bits = mean binary planes per weight in {1, 2, 3}; at bits 2 with "
             "abmp_ratio > 0 the column blocks get ABMP orders 1/2/3; group_size is the column block"),
    needs_hessian=True,
    options={**COMMON_OPTIONS, "row_sharding": None, "outlier_z": 2.0, "salient_weight": 3.0, "dor": True,
             "compensation": True, "comp_mode": "diag", "rsr_iters": 15, "rsr_tol": None, "z_diag": "chol",
             "orders": None, "percdamp": 0.01, "max_percdamp": 10.0},
    config_keys=("abmp_ratio", "abmp_scope", "target_bpw", "dor", "outlier_z", "salient_weight", "rsr_iters",
                 "compensation", "comp_mode", "z_diag", "percdamp", "scale_dtype"),
    check_shape=check_shape,
    check_options=check_options,
    check_option_shapes=check_orders,
    packed_bytes=planes_bytes,
    solve=solve,
    solve_kernel=solve_kernel,
    abmp_bits=2,
    hessian_factor="inverse",
)
