"""Public, stable quantization API: one weight matrix (or several sharing a Hessian) -> QuantizedWeight.

    qw = quantize_weight(w, H, method="quant_dllm", bits=2, group_size=128, abmp_ratio=0.05)
    qw, info = quantize_weight(w, H, method="gptq", bits=2, return_info=True)

w is float32 [out, in] (PyTorch layout), H [in, in] in the GPTQ convention H = (2/n) sum_s X_s^T X_s.
Methods:
  "rtn"        uniform min/max round-to-nearest (H ignored, may be None); bits 2..8.
  "gptq"       GPTQ, asymmetric min/max by default, damp 0.01, optional act-order; bits 2..8.
  "quant_dllm" DAQ + cross-block compensation; bits = planes per weight in {1, 2, 3}; with bits == 2 and
               abmp_ratio > 0 the blocks get ABMP orders 1/2/3 (mean 2); group_size is the column block.
Every input error is raised as QuantizationError before any heavy work.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import QuantizationError
from qdllm_jax.quant import abmp, packed, row_sharded
from qdllm_jax.quant.daq import daq_quantize
from qdllm_jax.quant.gptq import gptq_quantize
from qdllm_jax.quant.hessian import layer_errors, prepare_hessian
from qdllm_jax.quant.rtn import find_params, rtn_quantize

METHODS = ("rtn", "gptq", "quant_dllm")
SCALE_DTYPES = ("float16", "bfloat16", "float32")
_COMMON = {"scale_dtype"}
OPTIONS = {
    "rtn": _COMMON | {"sym"},
    "gptq": _COMMON | {"sym", "act_order", "percdamp", "max_percdamp", "row_sharding"},
    "quant_dllm": _COMMON | {"row_sharding", "outlier_z", "salient_weight", "dor", "compensation", "comp_mode", "rsr_iters", "rsr_tol",
                             "z_diag", "orders", "percdamp", "max_percdamp"},
}
DEFAULTS = dict(sym=False, act_order=False, percdamp=0.01, max_percdamp=10.0, scale_dtype="float16",
                outlier_z=2.0, salient_weight=3.0, dor=True, compensation=True, comp_mode="diag", rsr_iters=15, rsr_tol=None,
                z_diag="chol", orders=None, row_sharding=None)


def _err(msg):
  raise QuantizationError(msg)


@jax.jit
def _stats(a):
  """(number of non-finite entries, max |a| over the finite ones) of a float array."""
  fin = jnp.isfinite(a)
  return jnp.sum(~fin), jnp.max(jnp.where(fin, jnp.abs(a), 0))


def _check_matrix(w, name="w"):
  """float32 device copy of a finite 2-D float matrix, and its max |entry| (checked on device)."""
  shape, dtype = getattr(w, "shape", None), getattr(w, "dtype", None)
  if shape is None or dtype is None:
    try:
      w = np.asarray(w)
    except Exception as ex:  # noqa: BLE001  (anything that is not array-like)
      raise QuantizationError(f"{name} must be an array [out, in]; got {type(w).__name__} ({ex}).") from ex
    shape, dtype = w.shape, w.dtype
  if len(shape) != 2 or min(shape) == 0:
    _err(f"{name} must be a non-empty 2-D [out, in] matrix; got shape {tuple(shape)}.")
  if not jnp.issubdtype(dtype, jnp.floating):
    _err(f"{name} must be floating point; got dtype {dtype}. Cast it to float32.")
  a = jnp.asarray(w, jnp.float32)
  bad, amax = (float(x) for x in _stats(a))
  if bad:
    _err(f"{name} has {int(bad)} non-finite (NaN/Inf) entries; expected finite values. Fix the checkpoint or "
         f"the calibration statistics before quantizing.")
  return a, amax


def _validate(ws, hessian, method, bits, group_size, abmp_ratio, options):
  """Resolve options and check every input; returns (float32 weights, float32 H or None, resolved options)."""
  if method not in METHODS:
    _err(f"method={method!r} is unknown; expected one of {METHODS}.")
  unknown = sorted(set(options) - OPTIONS[method])
  if unknown:
    _err(f"unknown option(s) {unknown} for method {method!r}; allowed: {sorted(OPTIONS[method])}.")
  opt = {k: options.get(k, DEFAULTS[k]) for k in OPTIONS[method]}
  if opt["scale_dtype"] not in SCALE_DTYPES:
    _err(f"scale_dtype={opt['scale_dtype']!r} is not supported; expected one of {SCALE_DTYPES}.")
  rs = opt.get("row_sharding")
  if rs is not None:
    if not (isinstance(rs, tuple) and len(rs) == 2 and hasattr(rs[0], "axis_names")):
      _err(f"row_sharding={rs!r}: expected None or (mesh, axis name) to split the solver over output rows.")
    row_sharded.axis_size(*rs)
  checked = [_check_matrix(w, f"w[{i}]" if len(ws) > 1 else "w") for i, w in enumerate(ws)]
  ws = [a for a, _ in checked]
  n = ws[0].shape[1]
  for i, (w, amax) in enumerate(checked):
    if w.shape[1] != n:
      _err(f"matrices sharing a Hessian must have the same in_features; w[0] has {n}, w[{i}] has {w.shape[1]}.")
    if opt["scale_dtype"] == "float16" and amax > 3.0e4:
      _err(f"|w| reaches {amax:.3g}, beyond what float16 scales hold (max 65504); pass scale_dtype='float32' "
           f"or 'bfloat16'.")
  h = None
  if hessian is None:
    if method != "rtn":
      _err(f"method {method!r} needs the layer Hessian [in, in] = [{n}, {n}]; got None.")
  else:
    h, _ = _check_matrix(hessian, "hessian")
    if h.shape != (n, n):
      _err(f"hessian has shape {h.shape}; expected [in, in] = [{n}, {n}] for w of shape {ws[0].shape}.")
  if method in ("rtn", "gptq"):
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
      _err(f"bits={bits!r} is not supported by {method}; expected an integer in 2..8.")
    g = group_size
    if not isinstance(g, (int, np.integer)) or not (g == -1 or (0 < g and n % g == 0)):
      _err(f"group_size={g!r} does not divide in_features={n}; expected a divisor of {n} or -1 (per channel).")
    if method == "gptq" and g != -1 and not (128 % g == 0 or g % 128 == 0):
      _err(f"group_size={g} for gptq must divide 128 or be a multiple of 128 (lazy block size 128), or be -1.")
    if method == "gptq" and not 0 < opt["percdamp"] <= opt["max_percdamp"]:
      _err(f"percdamp={opt['percdamp']} must lie in (0, max_percdamp={opt['max_percdamp']}].")
    return ws, h, opt
  if bits not in (1, 2, 3) or isinstance(bits, bool):
    _err(f"bits={bits!r} is not supported by quant_dllm; expected the mean number of binary planes 1, 2 or 3.")
  g = group_size
  if not isinstance(g, (int, np.integer)) or g <= 0 or g % 32 or n % g:
    _err(f"group_size={g!r} (column block) must be a positive multiple of 32 dividing in_features={n}.")
  if not 0.0 <= float(abmp_ratio) <= 1.0:
    _err(f"abmp_ratio={abmp_ratio} must lie in [0, 1] (0.05 LLaDA, 0.10 Dream, 0 = uniform).")
  if opt["z_diag"] not in ("chol", "inv_diag"):
    _err(f"z_diag={opt['z_diag']!r} is unknown; expected 'chol' or 'inv_diag'.")
  if not isinstance(opt["rsr_iters"], (int, np.integer)) or opt["rsr_iters"] < 0:
    _err(f"rsr_iters={opt['rsr_iters']!r} must be a non-negative integer (default 15).")
  if opt["rsr_tol"] is not None and not opt["rsr_tol"] >= 0:
    _err(f"rsr_tol={opt['rsr_tol']!r} must be None or >= 0.")
  if opt["salient_weight"] <= 0:
    _err(f"salient_weight={opt['salient_weight']} must be > 0 (it multiplies squared errors).")
  if not 0 < opt["percdamp"] <= opt["max_percdamp"]:
    _err(f"percdamp={opt['percdamp']} must lie in (0, max_percdamp={opt['max_percdamp']}].")
  if opt["orders"] is not None:
    o = np.asarray(opt["orders"])
    nb = n // g
    want = (nb,) if o.ndim < 2 or len(ws) == 1 else (len(ws), nb)
    if o.shape != want or not np.issubdtype(o.dtype, np.integer) or o.min() < 1 or o.max() > 3:
      _err(f"orders must be {nb} integers in 1..3 (one per {g}-column block"
           + ("; or one such row per matrix" if len(ws) > 1 else "") + f"); got shape {o.shape}, dtype {o.dtype}"
           + (f", range {o.min()}..{o.max()}." if o.size and np.issubdtype(o.dtype, np.number) else "."))
  return ws, h, opt


def _orders_for(i, w, u, bits, group_size, abmp_ratio, opt):
  nb = w.shape[1] // group_size
  if opt["orders"] is not None:
    o = np.asarray(opt["orders"], np.int8)
    return o[i] if o.ndim == 2 else o
  if bits == 2 and abmp_ratio > 0:
    return abmp.allocate_orders(abmp.block_salience(w, u, group_size), abmp_ratio)
  return np.full(nb, bits, np.int8)


def _info(w, w_hat, h, extra):
  info = dict(extra)
  if h is not None:
    loss, rel = layer_errors(w, w_hat, h)
    info["layer_loss"], info["relative_output_error"] = float(loss), float(rel)
  return info


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "scale_dtype", "per_channel"))
def _gptq_batch(w, u, cs, cz, *, bits, group_size, sym, scale_dtype, per_channel):
  """vmap of gptq_quantize over a stack of same-shape matrices sharing U."""
  f = lambda w, cs, cz: gptq_quantize(w, u, cs if per_channel else None, cz if per_channel else None,
                                      bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype)
  return jax.vmap(f)(w, cs, cz)


def _run(ws, h, method, bits, group_size, abmp_ratio, opt, return_info):
  """Quantize matrices that share one Hessian. Returns a list of QuantizedWeight (or (qw, info) pairs)."""
  t0 = time.perf_counter()
  sd = opt["scale_dtype"]
  results = []
  if method == "rtn":
    for w in ws:
      codes, sc, zr, w_hat = rtn_quantize(w, bits=bits, group_size=group_size, sym=opt["sym"], scale_dtype=sd)
      qw = packed.from_uniform(codes, sc, zr, bits=bits, group_size=group_size, sym=opt["sym"],
                               scale_dtype=sd, method="rtn")
      results.append((qw, w_hat, dict(method="rtn")))
  elif method == "gptq":
    n = ws[0].shape[1]
    perm = inv = None
    hj = h
    if opt["act_order"]:
      dg = np.asarray(jnp.diagonal(h), np.float64)
      perm = np.argsort(-np.where(dg == 0, 1.0, dg), kind="stable")
      inv = np.argsort(perm)
      hj = h[perm][:, perm]
    ph = prepare_hessian(ws[0] if perm is None else ws[0][:, perm], hj, opt["percdamp"], opt["max_percdamp"])
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
          cs, cz = find_params(ws[i], bits, opt["sym"], sd) if per_channel else (None, None)
          outs[i] = row_sharded.gptq_rows(prep(ws[i]), ph.u, cs, cz, mesh=rs[0], axis=rs[1], bits=bits,
                                          group_size=group_size, sym=opt["sym"], scale_dtype=sd)
        continue
      if len(idx) == 1:  # no vmap for a single matrix
        w = ws[idx[0]]
        cs, cz = find_params(w, bits, opt["sym"], sd) if per_channel else (None, None)  # from the unfixed w
        outs[idx[0]] = gptq_quantize(prep(w), ph.u, cs, cz, bits=bits, group_size=group_size, sym=opt["sym"],
                                     scale_dtype=sd)
        continue
      wo = jnp.stack([ws[i] for i in idx])
      cs, cz = find_params(wo, bits, opt["sym"], sd)
      r = _gptq_batch(jax.vmap(prep)(wo), ph.u, cs, cz, bits=bits, group_size=group_size, sym=opt["sym"],
                      scale_dtype=sd, per_channel=per_channel)
      for j, i in enumerate(idx):
        outs[i] = jax.tree.map(lambda x: x[j], r)
    for w, r in zip(ws, outs):
      codes, w_hat, g_idx = r["codes"], r["w_hat"], None
      if perm is not None:
        codes, w_hat = codes[:, inv], w_hat[:, inv]
        g_idx = inv // (n if group_size == -1 else group_size)
      qw = packed.from_uniform(codes, r["scales"], r["zeros"], bits=bits, group_size=group_size, sym=opt["sym"],
                               g_idx=g_idx, scale_dtype=sd, method="gptq")
      results.append((qw, w_hat, dict(method="gptq", percdamp=ph.percdamp, delta=ph.delta,
                                      dead_columns=int(jnp.sum(ph.dead)), solver_loss=float(r["loss"]))))
  else:
    ph = prepare_hessian(ws[0], h, opt["percdamp"], opt["max_percdamp"])
    for i, w in enumerate(ws):
      wf = jnp.where(ph.dead[None, :], 0.0, w)
      orders = _orders_for(i, wf, ph.u, bits, group_size, abmp_ratio, opt)
      kw = dict(block=group_size, iters=int(opt["rsr_iters"]), outlier_z=float(opt["outlier_z"]),
                salient_weight=float(opt["salient_weight"]), dor=bool(opt["dor"]), z_diag=opt["z_diag"],
                compensation=bool(opt["compensation"]), comp_mode=opt["comp_mode"], scale_dtype=sd,
                rsr_tol=None if opt["rsr_tol"] is None else float(opt["rsr_tol"]))
      rs = opt["row_sharding"]
      if rs is not None and row_sharded.can_shard(w.shape[0], *rs):
        r = row_sharded.daq_rows(wf, ph.u, jnp.asarray(orders, jnp.int32), mesh=rs[0], axis=rs[1], **kw)
      else:
        r = daq_quantize(wf, ph.u, orders, **kw)
      qw = packed.from_binary_planes(r["bits"], r["a_r"], r["a_c"], orders, shape=w.shape, scale_dtype=sd,
                                     nominal_bits=bits)
      results.append((qw, r["w_hat"], dict(method="quant_dllm", percdamp=ph.percdamp, delta=ph.delta,
                                           dead_columns=int(jnp.sum(ph.dead)), solver_loss=float(r["loss"]),
                                           orders=np.asarray(orders))))
  if not return_info:
    return [qw for qw, _, _ in results]
  elapsed = time.perf_counter() - t0
  out = []
  for w, (qw, w_hat, extra) in zip(ws, results):
    extra.update(bits_per_weight=qw.bits_per_weight, solve_time_s=elapsed / len(ws), w_hat=w_hat)
    out.append((qw, _info(w, w_hat, h, extra)))
  return out


def quantize_weight(w, hessian, method: str = "quant_dllm", bits: int = 2, group_size: int = 128,
                    abmp_ratio: float = 0.05, return_info: bool = False, **options):
  """Quantize one linear weight.

  Args:
    w: float [out, in] (numpy or jax). hessian: [in, in], H = (2/n) sum X^T X (None allowed for "rtn").
    method: "rtn" | "gptq" | "quant_dllm".  bits: code bits (rtn/gptq, 2..8) or mean planes (quant_dllm, 1..3).
    group_size: quantization group (rtn/gptq; -1 = per channel) or DAQ column block (multiple of 32).
    abmp_ratio: ABMP ratio for quant_dllm with bits == 2 (0 = uniform order 2); ignored otherwise.
    options: sym, act_order, percdamp, max_percdamp, scale_dtype ("float16"), outlier_z, salient_weight,
      dor, compensation, comp_mode ("diag": released code | "block": exact block OBS update), rsr_iters, rsr_tol,
      z_diag ("chol" | "inv_diag"), orders (explicit per-block orders), row_sharding (None, or (mesh, axis):
      gptq / quant_dllm solve the output rows split over that mesh axis with shard_map; quant/row_sharded.py).
    return_info: also return a dict with layer_loss = tr((W - W^) H (W - W^)^T), relative_output_error,
      percdamp (damping used), delta, dead_columns, solver_loss, orders, bits_per_weight, solve_time_s and
      w_hat (float32 [out, in], equal to qw.dequantize()).
  Returns:
    QuantizedWeight, or (QuantizedWeight, info).
  """
  ws, h, opt = _validate([w], hessian, method, bits, group_size, abmp_ratio, options)
  return _run(ws, h, method, bits, group_size, abmp_ratio, opt, return_info)[0]


def quantize_weights_shared(ws, hessian, method: str = "quant_dllm", bits: int = 2, group_size: int = 128,
                            abmp_ratio: float = 0.05, return_info: bool = False, **options):
  """Quantize several matrices that share one Hessian (q/k/v, gate/up): one damping/Cholesky for all.

  GPTQ matrices with the same out dim are solved together with `vmap`; DAQ matrices are solved one after
  the other with the shared U (their per-block orders differ, and `lax.switch` under vmap would run all
  three order branches). Arguments as `quantize_weight`, except that the `orders` option may also be
  [len(ws), nb], one row per matrix (e.g. from global ABMP). Returns a list in the order of `ws`.
  """
  if not isinstance(ws, (list, tuple)) or not ws:
    _err(f"ws must be a non-empty list of [out, in] matrices; got {type(ws).__name__}.")
  ws, h, opt = _validate(list(ws), hessian, method, bits, group_size, abmp_ratio, options)
  return _run(ws, h, method, bits, group_size, abmp_ratio, opt, return_info)


__all__ = ["METHODS", "OPTIONS", "quantize_weight", "quantize_weights_shared"]
