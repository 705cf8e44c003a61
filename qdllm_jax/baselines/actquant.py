"""Weight-activation fake quantization (W8A8 / W4A4) of a LLaDA/Dream params pytree.

Activations are quantized dynamically, per token (over the last axis), as DuQuant/SmoothQuant do
(asymmetric) or as QuaRot does (symmetric):
    asym: s = max(xmax - xmin, 1e-5) / (2^b - 1),  z = round(-xmin / s),
          x^ = s (clamp(round(x / s) + z, 0, 2^b - 1) - z)
    sym:  m = 2^(b-1) - 1,  s = max(max|x|, 1e-5) / m,  x^ = s clamp(round(x / s), -(m + 1), m)
with xmin/xmax the per-token min/max (not widened to include 0, as OmniQuant's dynamic quantizer).

`forward_actquant` is `transformer.forward` with the input of every block linear (q/k/v, o, gate/up,
down) replaced by x^; embeddings and the LM head stay in full precision (reference ptq-baselines.md §1).
The block is re-assembled here from `models.layers` primitives because `transformer.block_forward` has no
hook on linear inputs; optional per-tap online transforms `rots` (QuaRot's Hadamard before down, DuQuant's
rotation-permutation) are applied before the quantizers.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qdllm_jax.errors import QuantizationError
from qdllm_jax.models import layers, transformer
from qdllm_jax.quant.rtn import rtn_quantize


def check_bits(bits, what: str, allow_none: bool = True):
  """Raise QuantizationError unless bits is an int in 2..16 (or None when allowed)."""
  if bits is None and allow_none:
    return
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
    raise QuantizationError(f"{what}={bits!r} is not supported; expected an integer in 2..16"
                            + (" or None (full precision)." if allow_none else "."))


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


def _aq(x, a_bits, a_sym, a_clip):
  return x if a_bits is None or a_bits >= 16 else fake_quant_per_token(x, a_bits, a_sym, a_clip)


def _rot(x, r):
  if r is None:
    return x
  return jnp.einsum("...f,fg->...g", x.astype(jnp.float32), r.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def actquant_block(p: dict, x: jax.Array, cfg, cos, sin, key_mask=None, *, a_bits=None, a_sym=False,
                   a_clip=1.0, rots=None, return_taps=False):
  """`transformer.block_forward` with each linear input transformed online and fake-quantized per token.

    h = Q(RMSNorm(x) M_qkv); x += o(Q(attn(rope(q h), rope(k h), v h) M_o))
    h2 = Q(RMSNorm(x) M_gu); x += down(Q(act M_down)),  act = silu(gate h2) * up h2
  with M_tap = rots[tap] (orthogonal; the weights reading that tap must already hold W M) or I.
  Args:
    p: block params (dense linears). x: [B, T, D]. cos/sin: float32 [B, T, head_dim].
    a_bits: activation bits (None/16: no activation quantization). a_clip: range ratio (1.0: none).
    rots: optional {tap: float32 [C, C]} for taps "qkv", "o", "gate_up", "down" (QuaRot: {"down": R_F}).
    return_taps: also return the (unquantized, transformed) linear inputs {"qkv", "o", "gate_up", "down"}.
  Returns:
    x_out [B, T, D] (and taps).
  """
  r = rots or {}
  b, t, _ = x.shape
  h = _rot(layers.rms_norm(x, p["attn_norm"], cfg.norm_eps), r.get("qkv"))
  hq = _aq(h, a_bits, a_sym, a_clip)
  q = layers.linear(hq, p["q"], p.get("q_bias")).reshape(b, t, cfg.n_heads, cfg.head_dim)
  k = layers.linear(hq, p["k"], p.get("k_bias")).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
  v = layers.linear(hq, p["v"], p.get("v_bias")).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
  q = layers.apply_rope(q, cos, sin, cfg.rope_full_precision)
  k = layers.apply_rope(k, cos, sin, cfg.rope_full_precision)
  a = _rot(layers.attention(q, k, v, key_mask).reshape(b, t, cfg.q_dim), r.get("o"))
  x = x + layers.linear(_aq(a, a_bits, a_sym, a_clip), p["o"])
  h2 = _rot(layers.rms_norm(x, p["ff_norm"], cfg.norm_eps), r.get("gate_up"))
  h2q = _aq(h2, a_bits, a_sym, a_clip)
  act = _rot(jax.nn.silu(layers.linear(h2q, p["gate"])) * layers.linear(h2q, p["up"]), r.get("down"))
  x = x + layers.linear(_aq(act, a_bits, a_sym, a_clip), p["down"])
  if return_taps:
    return x, {"qkv": h, "o": a, "gate_up": h2, "down": act}
  return x


@functools.partial(jax.jit, static_argnames=("cfg", "a_bits", "a_sym", "a_clip"))
def forward_actquant(params: dict, cfg, input_ids: jax.Array, a_bits=None, attention_mask=None, *,
                     a_sym: bool = False, a_clip: float = 1.0, rots=None) -> jax.Array:
  """Full model with per-token fake-quantized linear inputs: int32 [B, T] -> float32 logits [B, T, V].

  Args:
    params: params pytree (weights already fake-quantized by the caller, e.g. `fake_quant_weights`).
    cfg: ModelConfig (static). a_bits: activation bits or None (static). a_sym: symmetric (static).
    attention_mask: optional [B, T] (Dream padding). a_clip: activation range ratio (static).
    rots: optional list (one per block) of {tap: [C, C]} online transforms (see `actquant_block`).
  """
  check_bits(a_bits, "a_bits")
  pos, key_mask = transformer.positions_and_mask(cfg, input_ids, attention_mask)
  cos, sin = layers.rope_tables(pos, cfg.head_dim, cfg.rope_theta)
  x = transformer.embed(params, input_ids)
  for i, p in enumerate(params["blocks"]):
    x = actquant_block(p, x, cfg, cos, sin, key_mask, a_bits=a_bits, a_sym=a_sym, a_clip=a_clip,
                       rots=None if rots is None else rots[i])
  return transformer.head(params, cfg, x)


def fake_quant_weights(params: dict, w_bits: int, *, group_size: int = -1, sym: bool = False,
                       linears=transformer.LINEARS) -> dict:
  """Params with every block linear replaced by its RTN fake-quantized copy W^ (same shape and dtype).

  W^ per (row, group) from `quant.rtn.rtn_quantize` (min/max grid with 0 inside, float32 scales);
  group_size -1 = per output channel. Embeddings, norms and the head are unchanged.
  Args:
    params: params pytree with dense [out, in] linears. w_bits: 2..8 (16: return params unchanged).
  """
  check_bits(w_bits, "w_bits", allow_none=False)
  if w_bits >= 16:
    return params
  if w_bits > 8:
    raise QuantizationError(f"w_bits={w_bits} is not supported by RTN; expected 2..8 or 16 (no quantization).")
  blocks = []
  for p in params["blocks"]:
    p = dict(p)
    for n in linears:
      w = p[n]
      g = group_size
      if g != -1 and w.shape[1] % g:
        raise QuantizationError(f"group_size={g} does not divide in_features={w.shape[1]} of {n!r}; use a "
                                f"divisor or -1 (per channel).")
      p[n] = rtn_quantize(w.astype(jnp.float32), bits=w_bits, group_size=g, sym=sym,
                          scale_dtype="float32")[3].astype(w.dtype)
    blocks.append(p)
  return dict(params, blocks=blocks)


__all__ = ["check_bits", "fake_quant_per_token", "actquant_block", "forward_actquant", "fake_quant_weights"]
