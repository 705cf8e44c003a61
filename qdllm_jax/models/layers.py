"""Building blocks shared by LLaDA and Dream: RMSNorm, half-split RoPE, bidirectional attention, SwiGLU.

Weights are kept in the Hugging Face orientation `[out, in]` everywhere in the project (see models/hf.py),
so a linear layer is `y = x @ W^T (+ b)`. `linear` is the one dispatch point where a weight may instead be a
packed `QuantizedWeight` (anything with a `.matmul` path registered in `qdllm_jax.kernels`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.kernels import qmatmul


def linear(x: jax.Array, w, b: jax.Array | None = None) -> jax.Array:
  """y[..., o] = sum_i x[..., i] w[o, i] (+ b[o]).

  Args:
    x: [..., in] activations (float32 or bfloat16).
    w: [out, in] dense weight, or a packed `QuantizedWeight` (dispatched to `qdllm_jax.kernels.qmatmul`).
    b: optional [out] bias.
  Returns:
    [..., out] in x's dtype (float32 accumulation).
  """
  if isinstance(w, (jax.Array, np.ndarray)):
    y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
  else:
    y = qmatmul(x, w)  # packed weights: the kernels' dispatch point
  if b is not None:
    y = y + b.astype(y.dtype)
  return y


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  """y = w * cast(x32 * rsqrt(mean(x32^2) + eps), x.dtype), as both originals do. x: [..., D], w: [D]."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return w.astype(x.dtype) * y.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables of the HF Llama half-split RoPE.

  inv_freq_i = theta^(-2i/head_dim), f = pos ⊗ inv_freq, emb = concat(f, f).
  Args:
    positions: int [B, T] (or [T]).
  Returns:
    (cos, sin), float32 [B, T, head_dim].
  """
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  f = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([f, f], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, full_precision: bool) -> jax.Array:
  """x' = x cos + rot(x) sin, rot(x) = concat(-x[d/2:], x[:d/2]). x: [B, T, H, d]; cos/sin: [B, T, d].

  full_precision=True (LLaDA): rotate in float32 and cast back; else (Qwen2/Dream) cast cos/sin to x.dtype.
  """
  dtype = x.dtype
  if full_precision:
    x = x.astype(jnp.float32)
  else:
    cos, sin = cos.astype(dtype), sin.astype(dtype)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos[:, :, None, :] + rot * sin[:, :, None, :]).astype(dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  """Bidirectional scaled dot-product attention with grouped KV heads.

  a = softmax(q k^T / sqrt(d) + bias) v, softmax in float32; query head h reads KV head h // (Hq/Hkv).
  Args:
    q: [B, T, Hq, d]; k, v: [B, T, Hkv, d].
    key_mask: optional bool [B, T], False at padding keys (they get -inf before the softmax).
  Returns:
    [B, T, Hq, d] in q's dtype.
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, hq // hkv, d)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) / np.sqrt(d)
  if key_mask is not None:
    s = jnp.where(key_mask[:, None, None, None, :], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, preferred_element_type=jnp.float32).astype(q.dtype)
  return o.reshape(b, t, hq, d)


def swiglu(h: jax.Array, gate, up, down) -> tuple[jax.Array, jax.Array]:
  """MLP: down(silu(gate h) * up h). Returns (output [.., D], the down projection's input [.., F])."""
  a = jax.nn.silu(linear(h, gate)) * linear(h, up)
  return linear(a, down), a
