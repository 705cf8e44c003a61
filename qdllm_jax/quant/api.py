"""Public, stable quantization API: one weight matrix (or several sharing a Hessian) -> QuantizedWeight.

    qw = quantize_weight(w, H, method="quant_dllm", bits=2, group_size=128, abmp_ratio=0.05)
    qw, info = quantize_weight(w, H, method="gptq", bits=2, return_info=True)

w is float32 [out, in] (PyTorch layout), H [in, in] in the GPTQ convention H = (2/n) sum_s X_s^T X_s.
Methods: the registry of quant/methods.py (`quant_dllm`, `gptq`, `rtn`; each declared in quant/method_<name>.py
with its options, validation, packed size and solver).
Every input error is raised as QuantizationError before any heavy work.
"""
from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import QuantizationError
from qdllm_jax.quant import row_sharded
from qdllm_jax.quant.hessian import layer_errors, output_energy
from qdllm_jax.quant.method_spec import SCALE_DTYPES
from qdllm_jax.quant.methods import METHODS, REGISTRY, get_method

log = logging.getLogger(__name__)

OPTIONS = {name: frozenset(m.options) for name, m in REGISTRY.items()}  # accepted options per method


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


SYMMETRY_TOL = 1e-4  # max |H - H^T| / max |H| accepted (float32 X^T X is symmetric to ~1e-7)


@jax.jit
def _hessian_stats(h):
  """(max |H|, max |H - H^T|, number of zero diagonal entries) of a float32 [n, n] matrix."""
  return jnp.max(jnp.abs(h)), jnp.max(jnp.abs(h - h.T)), jnp.sum(jnp.diagonal(h) == 0)


def _check_hessian(h) -> None:
  """QuantizationError for an all-zero or non-symmetric H [n, n]; a logged warning with the dead-column count
  (zero diagonal: those inputs were always 0, their weights are set to 0) when only some columns are dead."""
  n = h.shape[0]
  scale, asym, dead = (float(x) for x in _hessian_stats(h))
  if scale == 0:
    _err(f"hessian is all zero ({n} of {n} columns dead): the layer saw only zero inputs, and every weight would "
         "be quantized to 0. Check the calibration data that reaches this layer (e.g. its masking).")
  if asym > SYMMETRY_TOL * scale:
    _err(f"hessian is not symmetric: max |H - H^T| = {asym:.3g}, {asym / scale:.2g} of max |H| (tolerance "
         f"{SYMMETRY_TOL:g}); expected H = (2/n) sum X^T X. Pass the layer's Gram matrix (or (H + H.T) / 2 if the "
         "asymmetry is a rounding artifact).")
  if dead:
    log.warning("hessian has %d of %d dead columns (zero diagonal: those inputs were always 0); their weights "
                "are quantized as 0", int(dead), n)


def _validate(ws, hessian, method, bits, group_size, abmp_ratio, options):
  """Resolve options and check every input; returns (float32 weights, float32 H or None, resolved options)."""
  spec = get_method(method)
  unknown = spec.unknown_options(options)
  if unknown:
    _err(f"unknown option(s) {unknown} for method {method!r}; allowed: {sorted(spec.options)}.")
  opt = spec.resolve_options(options)
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
    if spec.needs_hessian:
      _err(f"method {method!r} needs the layer Hessian [in, in] = [{n}, {n}]; got None.")
  else:
    h, _ = _check_matrix(hessian, "hessian")
    if h.shape != (n, n):
      _err(f"hessian has shape {h.shape}; expected [in, in] = [{n}, {n}] for w of shape {ws[0].shape}.")
    if spec.needs_hessian:
      _check_hessian(h)
  bad = spec.check_shape(bits, group_size, n)
  if bad is not None:
    field, want = bad
    value = bits if field == "bits" else group_size
    _err(f"{field}={value!r} is not supported by {method}; expected {want}.")
  if not 0.0 <= float(abmp_ratio) <= 1.0:
    _err(f"abmp_ratio={abmp_ratio} must lie in [0, 1] (0.05 LLaDA, 0.10 Dream, 0 = uniform).")
  why = spec.check_options(opt) or spec.check_option_shapes(opt, group_size, n, len(ws))
  if why:
    _err(why)
  return ws, h, opt


def _info(w, w_hat, h, extra):
  """The info dict; layer_loss = tr(E H E^T) comes from the solver where it reports one (GPTQ: from its errors,
  no [out, in] x [in, in] product), else from layer_errors."""
  info = dict(extra)
  if h is not None and "layer_loss" in info:
    info["relative_sq_output_error"] = info["layer_loss"] / float(output_energy(w, h))
  elif h is not None:
    loss, rel = layer_errors(w, w_hat, h)
    info["layer_loss"], info["relative_sq_output_error"] = float(loss), float(rel)
  return info


def _run(ws, h, method, bits, group_size, abmp_ratio, opt, return_info):
  """Quantize matrices that share one Hessian with the method's solver. Returns a list of QuantizedWeight (or
  (qw, info) pairs)."""
  t0 = time.perf_counter()
  results = get_method(method).solve(ws, h, bits, group_size, abmp_ratio, opt)
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
    return_info: also return a dict with layer_loss = tr((W - W^) H (W - W^)^T), relative_sq_output_error,
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
