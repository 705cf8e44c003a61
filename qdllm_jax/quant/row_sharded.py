"""Per-layer solvers sharded over the output rows of W on one mesh axis (`jax.shard_map`).

GPTQ: given U (replicated), every output row is an independent problem (its group scales come from its own
weights), so device d solves W[rows_d] alone; only the solver loss is summed (psum).
DAQ: the row scales a_r, the signs B and the compensation W[:, >b] -= E U[b, >b] are row-local; the column
scales a_c (a closed-form sum over rows), the greedy init's column means, the DOR z-score statistics and
threshold, and the early-stopping objective are sums over rows, reduced across the axis (daq.py `axis_name`:
psum / pmin / pmax). The result equals the single-device solver up to float rounding (sums in another order).

Shapes: w float32 [out, in] with out divisible by the axis size; u float32 [in, in] (replicated); outputs
as `gptq_quantize` / `daq_quantize`, sharded over rows where they have a row axis.
"""
from __future__ import annotations

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from qdllm_jax.errors import QuantizationError
from qdllm_jax.quant.daq import daq_quantize
from qdllm_jax.quant.gptq import gptq_quantize


def axis_size(mesh, axis: str) -> int:
  if axis not in mesh.axis_names:
    raise QuantizationError(f"row sharding axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
  return int(mesh.shape[axis])


def can_shard(out: int, mesh, axis: str) -> bool:
  """Whether `out` rows split evenly over the axis (and there is more than one device on it)."""
  k = axis_size(mesh, axis)
  return k > 1 and out % k == 0


def _shard(f, mesh, in_specs, out_specs):
  return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def gptq_rows(w, u, channel_scale=None, channel_zero=None, *, mesh, axis: str, **kw) -> dict:
  """`gptq_quantize(w, u, ...)` with w's rows split over `axis` of `mesh` (kw: bits, group_size, sym, ...)."""
  if not can_shard(w.shape[0], mesh, axis):
    raise QuantizationError(f"gptq_rows: {w.shape[0]} rows do not split over axis {axis!r} of size "
                            f"{axis_size(mesh, axis)}")
  per_channel = channel_scale is not None

  def f(w_, u_, *cz):
    r = gptq_quantize(w_, u_, *(cz if per_channel else (None, None)), **kw)
    return dict(r, loss=lax.psum(r["loss"], axis))

  rows = P(axis, None)
  out = dict(codes=rows, scales=rows, zeros=rows, w_hat=rows, loss=P())
  args = (w, u) + ((channel_scale, channel_zero) if per_channel else ())
  specs = (rows, P(None, None)) + ((P(axis), P(axis)) if per_channel else ())
  return _shard(f, mesh, specs, out)(*args)


def daq_rows(w, u, orders, *, mesh, axis: str, **kw) -> dict:
  """`daq_quantize(w, u, orders, ...)` with w's rows split over `axis` of `mesh` (kw: block, iters, dor, ...)."""
  if not can_shard(w.shape[0], mesh, axis):
    raise QuantizationError(f"daq_rows: {w.shape[0]} rows do not split over axis {axis!r} of size "
                            f"{axis_size(mesh, axis)}")

  def f(w_, u_, o_):
    r = daq_quantize(w_, u_, o_, axis_name=axis, **kw)
    return dict(r, loss=lax.psum(r["loss"], axis))

  out = dict(w_hat=P(axis, None), bits=P(None, None, axis, None), a_r=P(None, None, axis), a_c=P(), loss=P())
  return _shard(f, mesh, (P(axis, None), P(None, None), P()), out)(w, u, orders)


__all__ = ["axis_size", "can_shard", "gptq_rows", "daq_rows"]
