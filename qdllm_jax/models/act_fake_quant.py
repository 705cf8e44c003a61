"""Activation quantization of linear inputs (W8A8 / W4A4 models) and online input transforms.

Activations are quantized dynamically, per token (over the last axis), as DuQuant/SmoothQuant do
(asymmetric) or as QuaRot does (symmetric):
    asym: s = max(xmax - xmin, 1e-5) / (2^b - 1),  z = round(-xmin / s),
          x^ = s (clamp(round(x / s) + z, 0, 2^b - 1) - z)
    sym:  m = 2^(b-1) - 1,  s = max(max|x|, 1e-5) / m,  x^ = s clamp(round(x / s), -(m + 1), m)
with xmin/xmax the per-token min/max times `clip` (not widened to include 0, as OmniQuant's dynamic quantizer).

`ActQuant` is the static (hashable) setting a `Model` carries; `transformer.block_forward` applies it to the
input of every block linear (q/k/v, o, gate/up, down) after the block's optional online transforms
`p["online"][tap]`: a matrix M [C, C] (x -> x M: QuaRot's Hadamard before down, DuQuant's rotation-permutation)
or a vector r [C] (x -> x * r = x diag(r): AWQ's per-input-channel divisor 1/s where a scale cannot be folded
into the op before the linear group, e.g. on BERT; baselines/awq.py).
Embeddings and the LM head stay in full precision (arXiv 2508.14896, experimental setup).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qdllm_jax.errors import QuantizationError

ONLINE = "online"  # block params key holding {tap: [C, C] matrix or [C] diagonal} online transforms


def fake_quant_per_token(x: jax.Array, bits: int, sym: bool = False, clip: float = 1.0) -> jax.Array:
  """Per-token (last-axis) fake quantization x -> x^ (equations in the module docstring).

  Args:
    x: float [..., C]. bits: 2..16. sym: symmetric (QuaRot) instead of asymmetric (SmoothQuant/DuQuant).
    clip: ratio applied to the per-token range (xmin, xmax <- clip xmin, clip xmax; DuQuant's lac 0.9).
  Returns:
    x^ in x's dtype, [..., C]; computed in float32.
  """
  x32 = x.astype(jnp.float32)
  if sym:
    m = 2 ** (bits - 1) - 1
    s = jnp.maximum(clip * jnp.max(jnp.abs(x32), axis=-1, keepdims=True), 1e-5) / m
    return (s * jnp.clip(jnp.round(x32 / s), -(m + 1), m)).astype(x.dtype)
  maxq = 2 ** bits - 1
  xmin = clip * jnp.min(x32, axis=-1, keepdims=True)
  xmax = clip * jnp.max(x32, axis=-1, keepdims=True)
  s = jnp.maximum(xmax - xmin, 1e-5) / maxq
  z = jnp.round(-xmin / s)
  return (s * (jnp.clip(jnp.round(x32 / s) + z, 0, maxq) - z)).astype(x.dtype)


def check_bits(bits, what: str, allow_none: bool = True):
  """Raise QuantizationError unless bits is an int in 2..16 (or None when allowed)."""
  if bits is None and allow_none:
    return
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
    raise QuantizationError(f"{what}={bits!r} is not supported; expected an integer in 2..16"
                            + (" or None (full precision)." if allow_none else "."))


@dataclasses.dataclass(frozen=True)
class ActQuant:
  """Per-token fake quantization of every block linear's input: bits 2..16 (16: identity), sym, clip in (0, 1]."""
  bits: int
  sym: bool = False
  clip: float = 1.0

  def __post_init__(self):
    check_bits(self.bits, "a_bits", allow_none=False)
    if not 0.0 < float(self.clip) <= 1.0:
      raise QuantizationError(f"activation clip={self.clip!r} must be in (0, 1] (DuQuant uses 0.9)")

  def __call__(self, x: jax.Array) -> jax.Array:
    return x if self.bits >= 16 else fake_quant_per_token(x, self.bits, self.sym, self.clip)


def act_quant(bits=None, sym: bool = False, clip: float = 1.0) -> ActQuant | None:
  """ActQuant(bits, sym, clip), or None for full-precision activations (bits None or >= 16)."""
  check_bits(bits, "a_bits")
  return None if bits is None or bits >= 16 else ActQuant(bits, sym, clip)


def online_transform(x: jax.Array, r) -> jax.Array:
  """The online transform of x [..., C]: x r for a matrix r [C, C] (float32, HIGHEST precision), x * r (= x diag(r))
  for a vector r [C] (float32); result in x's dtype. x if r is None."""
  if r is None:
    return x
  if r.ndim == 1:
    return (x.astype(jnp.float32) * r.astype(jnp.float32)).astype(x.dtype)
  return jnp.einsum("...f,fg->...g", x.astype(jnp.float32), r.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def with_online(params: dict, rots) -> dict:
  """params with block i's online transforms rots[i] ({tap: [C, C] or [C]}) stored under p["online"]; rots None:
  as is."""
  if rots is None:
    return params
  if len(rots) != len(params["blocks"]):
    raise QuantizationError(f"rots has {len(rots)} entries for {len(params['blocks'])} blocks; pass one "
                            "{tap: matrix} dict (or None) per block")
  blocks = []
  for p, r in zip(params["blocks"], rots):
    p = {k: v for k, v in p.items() if k != ONLINE}
    if r:
      p[ONLINE] = dict(r)
    blocks.append(p)
  return dict(params, blocks=blocks)


__all__ = ["ONLINE", "ActQuant", "act_quant", "check_bits", "fake_quant_per_token", "online_transform", "with_online",
           "tap_reader"]


def tap_reader(p: dict, act=None):
  """(read, taps) for one block's forward: read(tap, a) applies the block's online transform of that tap
  (p[ONLINE][tap], if any), records the result in taps[tap] (what calibration captures) and returns it through
  the activation quantizer `act` (None: unchanged)."""
  online, taps = p.get(ONLINE, {}), {}

  def read(tap, a):
    a = online_transform(a, online.get(tap))
    taps[tap] = a
    return a if act is None else act(a)

  return read, taps
