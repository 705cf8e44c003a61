"""Functional calibration passes over one transformer block.

`capture_block` runs calibration activations [N, L, D] through the model family's `block_forward`
(models/families.py) in chunks of `chunk_size` sequences and accumulates, per linear group (LLaDA/Dream: "qkv",
"o", "gate_up", "down"; BERT: "qkv", "o", "up", "down"), the input Hessian of GPTQ:
    H_g = (2 / n) sum_s X_{g,s}^T X_{g,s}     float32 [c_g, c_g],  X_{g,s}: [L, c_g], n = number of sequences,
which equals the running update H <- H n/(n+1); n <- n+1; H <- H + (2/n) X^T X. q/k/v share one H (their
common input), gate/up share one. It optionally also returns the block's outputs (the next block's
inputs). The chunk step is jitted once per (chunk shape, config, taps): params and activations are
arguments, never closed-over constants. A last partial chunk is taken as the final `chunk_size` rows
(overlapping the previous chunk) with the already counted rows weighted 0, so every call has one shape.

Activations may be a device array or a host NumPy array (host offload); outputs come back in the same
kind. X^T X is computed with `Precision.HIGHEST` so accelerators do not round it to bf16/tf32.

Data parallelism: when the activations are a jax.Array whose rows are split over k devices (the data axis of
the run's mesh), each chunk takes r = max(1, chunk_size // k) rows from *every* shard (rows d N/k + i .. + r,
d < k), so all k devices compute every chunk step and the X^T X sums are reduced across them by XLA; a
contiguous chunk would sit on one device and leave the others idle. Host (offloaded) activations are placed
chunk by chunk with `chunk_sharding` (rows over the data axis) when given, for the same effect.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import ConfigError
from qdllm_jax.models.families import family_of
from qdllm_jax.models.model_config import ModelConfig
from qdllm_jax.sharding import host_array


@dataclasses.dataclass
class Capture:
  """Result of `capture_block`.

  Attributes:
    hessians: {tap: float32 [c, c]} H = (2/n) sum_s X_s^T X_s for each requested tap.
    n: number of sequences counted.
    outputs: the block's outputs [N, L, D] (device or host array like the inputs), or None.
  """
  hessians: dict
  n: int
  outputs: object = None


@functools.partial(jax.jit, static_argnames=("cfg", "taps", "with_outputs"))
def _chunk_step(p, x, weight, key_mask, cfg, taps, with_outputs):
  """One chunk: (block outputs [B, L, D] or None, {tap: sum_b weight_b X_b^T X_b float32 [c, c]})."""
  b, t, _ = x.shape
  family = family_of(cfg)
  ctx = family.block_context(cfg, b, t, key_mask)
  out, tp = family.block_forward(p, x, cfg, ctx, return_taps=True)
  xtx = {}
  for g in taps:
    a = tp[g].astype(jnp.float32)
    xtx[g] = jnp.einsum("btc,btd->cd", a * weight[:, None, None], a, precision=jax.lax.Precision.HIGHEST)
  return (out if with_outputs else None), xtx


def _put_rows(buf, rows, start):
  return jax.lax.dynamic_update_slice(buf, rows.astype(buf.dtype), (start,) + (0,) * (buf.ndim - 1))


_put_donated = jax.jit(_put_rows, donate_argnums=0)


@functools.partial(jax.jit, static_argnames=("k", "r"))
def _take_interleaved(a, start, k, r):
  """Rows {d N/k + start + j : d < k, j < r} of a [N, ...] as [k r, ...] (row-sharded like a, no communication)."""
  a4 = a.reshape((k, a.shape[0] // k) + a.shape[1:])
  return jax.lax.dynamic_slice_in_dim(a4, start, r, axis=1).reshape((k * r,) + a.shape[1:])


@functools.partial(jax.jit, static_argnames=("k",), donate_argnums=0)
def _put_interleaved(buf, rows, start, k):
  b4 = buf.reshape((k, buf.shape[0] // k) + buf.shape[1:])
  r4 = rows.astype(buf.dtype).reshape((k, rows.shape[0] // k) + rows.shape[1:])
  return jax.lax.dynamic_update_slice(b4, r4, (0, start) + (0,) * (buf.ndim - 1)).reshape(buf.shape)


def _place(rows, chunk_sharding):
  """rows [c, ...] on the devices: split by chunk_sharding's first axis when it divides c, else the default."""
  if chunk_sharding is not None and np.ndim(rows) >= 1:
    spec = tuple(chunk_sharding.spec)[:1] + (None,) * (np.ndim(rows) - 1)
    sh = jax.sharding.NamedSharding(chunk_sharding.mesh, jax.sharding.PartitionSpec(*spec))
    k = int(np.prod([chunk_sharding.mesh.shape[a] for a in np.atleast_1d(spec[0])])) if spec[0] else 1
    if k > 1 and np.shape(rows)[0] % k == 0:
      return jax.device_put(rows, sh)
  return jnp.asarray(rows)


def row_shards(xs) -> int:
  """How many devices split the rows of xs (1 for a host array or a replicated/unsharded one)."""
  if not isinstance(xs, jax.Array) or xs.ndim == 0 or xs.shape[0] == 0:
    return 1
  return xs.shape[0] // xs.sharding.shard_shape(xs.shape)[0]


def chunk_starts(n: int, chunk_size: int) -> list[tuple[int, int]]:
  """[(start, first_new_row)] covering rows 0..n-1 with windows of min(chunk_size, n) rows; the last window
  is [n - chunk_size, n) and its rows below `first_new_row` were already counted."""
  cs = min(chunk_size, n)
  out, s = [], 0
  while s < n:
    start = min(s, n - cs)
    out.append((start, s))
    s = start + cs
  return out


def capture_block(p: dict, xs, cfg: ModelConfig, *, taps=None, chunk_size: int = 8, key_mask=None,
                  with_outputs: bool = True, host_buffer: bool | None = None, chunk_sharding=None) -> Capture:
  """Run one block over the calibration activations; accumulate per-tap Hessians and the outputs.

  Args:
    p: the block's params (dense [out, in] linears; quantized ones already dequantized in place).
    xs: [N, L, D] block inputs (jax or NumPy array, the model dtype).
    cfg: model config (static).
    taps: which linear-group inputs to accumulate H for (a subset of the family's linear groups; None: all).
    chunk_size: sequences per jitted step.
    key_mask: optional bool [N, L] (Dream padding; None for full calibration windows).
    with_outputs: also return the block outputs [N, L, D].
    host_buffer: collect the outputs in a host buffer (None: when xs is a NumPy array or the backend is CPU,
      which cannot donate buffers) or in a donated device buffer.
    chunk_sharding: optional NamedSharding splitting a chunk's rows over a mesh axis, used to place the chunks
      of host (NumPy) activations so that every device of that axis computes (ignored when the chunk's rows
      do not divide; device arrays keep their own sharding).
  Returns:
    Capture(hessians={tap: float32 [c, c]}, n=N, outputs=[N, L, D] or None).
  """
  known = tuple(family_of(cfg).linear_groups)
  taps = known if taps is None else tuple(taps)
  bad = [t for t in taps if t not in known]
  if bad:
    raise ConfigError(f"capture_block: unknown taps {bad}; expected a subset of {known}")
  if chunk_size < 1:
    raise ConfigError(f"capture_block: chunk_size={chunk_size}; expected >= 1")
  n = int(xs.shape[0])
  host = isinstance(xs, np.ndarray)
  sums = {}
  # Outputs go to a host buffer when the inputs are on the host, or on CPU (which cannot donate buffers,
  # so an on-device update would copy the whole buffer per chunk); else to a donated device buffer.
  host_out = (host or jax.default_backend() == "cpu") if host_buffer is None else host_buffer
  out = None
  if with_outputs:
    out = np.empty(xs.shape, xs.dtype) if host_out else jnp.zeros(
        xs.shape, xs.dtype, device=xs.sharding if isinstance(xs, jax.Array) else None)
  k = row_shards(xs)
  per = n // k  # rows per shard; chunks take r of them from each shard
  for start, new in chunk_starts(per, max(1, chunk_size // k) if k > 1 else chunk_size):
    cs = min(max(1, chunk_size // k) if k > 1 else chunk_size, per)
    weight = (jnp.tile(jnp.arange(start, start + cs), k) >= new).astype(jnp.float32)
    if k > 1:
      x = _take_interleaved(xs, start, k, cs)
      km = None if key_mask is None else _take_interleaved(jnp.asarray(key_mask), start, k, cs)
    else:
      x = _place(xs[start:start + cs], chunk_sharding)
      km = None if key_mask is None else _place(key_mask[start:start + cs], chunk_sharding)
    o, xtx = _chunk_step(p, x, weight, km, cfg, taps, with_outputs)
    for g, v in xtx.items():
      sums[g] = v if g not in sums else sums[g] + v
    if with_outputs:
      if host_out:
        out.reshape((k, per) + out.shape[1:])[:, start:start + cs] = host_array(o).reshape((k, cs) + o.shape[1:])
      elif k > 1:
        out = _put_interleaved(out, o, start, k)
      else:
        out = _put_donated(out, o, start)
  if with_outputs and host_out and not host:
    out = jnp.asarray(out)
  hessians = {g: (2.0 / n) * s for g, s in sums.items()}
  return Capture(hessians=hessians, n=n, outputs=out)


def block_outputs(p: dict, xs, cfg: ModelConfig, *, chunk_size: int = 8, key_mask=None, chunk_sharding=None):
  """The block's outputs [N, L, D] on the calibration activations (no Hessians)."""
  return capture_block(p, xs, cfg, taps=(), chunk_size=chunk_size, key_mask=key_mask,
                       chunk_sharding=chunk_sharding).outputs
