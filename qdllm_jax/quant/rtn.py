"""Uniform min/max quantizer of GPTQ's `Quantizer` (weight=True, no MSE grid) and round-to-nearest (RTN).

For a row x of a group (n columns), maxq = 2^bits - 1:
    xmin = min(min_j x_j, 0),  xmax = max(max_j x_j, 0)
    sym:  xmax = max(|xmin|, xmax); xmin = -xmax where xmin < 0   (an all-non-negative row keeps xmin = 0)
    xmin = xmax = 0  ->  xmin = -1, xmax = +1
    scale = (xmax - xmin) / maxq
    zero  = round(-xmin / scale)  (asym),   (maxq + 1) / 2  (sym)
    q = clamp(round(x / scale) + zero, 0, maxq),   x^ = scale (q - zero)
round() is round-half-to-even (as torch.round).

Storage rounding: `scale_dtype` (e.g. "float16") rounds the scale to the storage dtype BEFORE the zero point
and the codes are computed, so the codes and x^ are exactly what the packed weight dequantizes to. A scale
that rounds to 0 becomes the dtype's smallest normal number. scale_dtype=None keeps the float32 scale (the
original GPTQ arithmetic). The asymmetric zero is clamped to [0, maxq] (a no-op except for rounding).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def round_scale(scale, scale_dtype):
  """Round a positive scale to `scale_dtype` and back to scale.dtype; 0 -> the dtype's smallest normal."""
  if scale_dtype is None:
    return scale
  sd = jnp.dtype(scale_dtype)
  s = scale.astype(sd).astype(scale.dtype)
  return jnp.where(s > 0, s, jnp.asarray(jnp.finfo(sd).tiny, scale.dtype))


def find_params(x, bits: int, sym: bool, scale_dtype=None):
  """Per-row scale and zero of a group.

  Args:
    x: float [..., rows, n] (the group's weights, one row per output channel).
    bits: 2..8. sym: symmetric grid. scale_dtype: storage dtype of the scale (None: unrounded).
  Returns:
    (scale [..., rows], zero [..., rows]) in x.dtype; zero holds integers in [0, maxq].
  """
  maxq = 2 ** bits - 1
  zero_ = jnp.zeros((), x.dtype)
  xmin = jnp.minimum(jnp.min(x, axis=-1), zero_)
  xmax = jnp.maximum(jnp.max(x, axis=-1), zero_)
  if sym:
    xmax = jnp.maximum(jnp.abs(xmin), xmax)
    xmin = jnp.where(xmin < 0, -xmax, xmin)
  both = (xmin == 0) & (xmax == 0)
  xmin = jnp.where(both, -1.0, xmin).astype(x.dtype)
  xmax = jnp.where(both, 1.0, xmax).astype(x.dtype)
  scale = round_scale((xmax - xmin) / maxq, scale_dtype)
  if sym:
    zero = jnp.full_like(scale, (maxq + 1) / 2)
  else:
    zero = jnp.clip(jnp.round(-xmin / scale), 0, maxq)
  return scale, zero


def quantize_codes(x, scale, zero, bits: int):
  """q = clamp(round(x / scale) + zero, 0, maxq) as x.dtype (integer-valued); shapes broadcast."""
  return jnp.clip(jnp.round(x / scale) + zero, 0, 2 ** bits - 1)


def dequantize_codes(q, scale, zero):
  """x^ = scale (q - zero); shapes broadcast; float."""
  return scale * (q - zero)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "scale_dtype"))
def rtn_quantize(w, *, bits: int, group_size: int = 128, sym: bool = False, scale_dtype="float16"):
  """Round-to-nearest with per-(row, group) min/max parameters.

  Args:
    w: float [out, in]. group_size: g dividing `in`, or -1 (one group per row).
  Returns:
    (codes uint8 [out, in], scales [out, G], zeros [out, G] (integer-valued), w_hat [out, in]), G = in/g
    (1 for g = -1); scales/zeros/w_hat in w.dtype.
  """
  out, n = w.shape
  g = n if group_size == -1 else group_size
  wg = w.reshape(out, n // g, g)
  scale, zero = find_params(wg, bits, sym, scale_dtype)
  q = quantize_codes(wg, scale[..., None], zero[..., None], bits)
  w_hat = dequantize_codes(q, scale[..., None], zero[..., None]).reshape(out, n)
  return q.reshape(out, n).astype(jnp.uint8), scale, zero, w_hat


__all__ = ["round_scale", "find_params", "quantize_codes", "dequantize_codes", "rtn_quantize"]
