"""Independent NumPy (float64) transcription of one LLaDA/Dream block, returning its linear-group inputs.

Written from the equations of the released modeling code (pre-norm block, half-split RoPE, bidirectional
GQA attention, SwiGLU), not from qdllm_jax.models, so tests can check the JAX passes against it.
"""
import numpy as np


def rms_norm(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope(x, pos, theta):
  """x [B, T, H, d], pos [T] -> x cos + rot(x) sin (half-split)."""
  d = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
  f = pos[:, None].astype(np.float64) * inv[None, :]
  emb = np.concatenate([f, f], -1)
  cos, sin = np.cos(emb)[None, :, None, :], np.sin(emb)[None, :, None, :]
  rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
  return x * cos + rot * sin


def block(p, x, cfg):
  """x [B, T, D] -> (out [B, T, D], {"qkv", "o", "gate_up", "down"} taps), all float64."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items() if hasattr(v, "shape")}
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
  q = h @ p["q"].T + p.get("q_bias", 0.0)
  k = h @ p["k"].T + p.get("k_bias", 0.0)
  v = h @ p["v"].T + p.get("v_bias", 0.0)
  pos = np.arange(t)
  q = rope(q.reshape(b, t, hq, d), pos, cfg.rope_theta)
  k = rope(k.reshape(b, t, hkv, d), pos, cfg.rope_theta)
  v = v.reshape(b, t, hkv, d)
  a = np.zeros((b, t, hq, d))
  for head in range(hq):
    kh = head // (hq // hkv)
    s = np.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kh]) / np.sqrt(d)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    a[:, :, head] = np.einsum("bqk,bkd->bqd", s, v[:, :, kh])
  a = a.reshape(b, t, hq * d)
  x = x + a @ p["o"].T
  h2 = rms_norm(x, p["ff_norm"], cfg.norm_eps)
  g = h2 @ p["gate"].T
  act = g / (1.0 + np.exp(-g)) * (h2 @ p["up"].T)
  x = x + act @ p["down"].T
  return x, {"qkv": h, "o": a, "gate_up": h2, "down": act}


def hessian(xs):
  """(2/n) sum_s X_s^T X_s for xs [n, L, c] (float64)."""
  xs = np.asarray(xs, np.float64)
  return 2.0 / xs.shape[0] * np.einsum("slc,sld->cd", xs, xs)
