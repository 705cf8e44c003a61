"""Independent NumPy (float64) references for the baseline tests: per-token fake quantization and a full
LLaDA forward with a hook on every linear input, written from the equations (LLaDA arXiv 2502.09992 and
the released modeling code), not from qdllm_jax."""
import numpy as np


def fq_token(x, bits, sym=False, clip=1.0):
  x = np.asarray(x, np.float64)
  if sym:
    m = 2 ** (bits - 1) - 1
    s = np.maximum(clip * np.abs(x).max(-1, keepdims=True), 1e-5) / m
    return s * np.clip(np.round(x / s), -m - 1, m)
  mx = 2 ** bits - 1
  lo, hi = clip * x.min(-1, keepdims=True), clip * x.max(-1, keepdims=True)
  s = np.maximum(hi - lo, 1e-5) / mx
  z = np.round(-lo / s)
  return s * (np.clip(np.round(x / s) + z, 0, mx) - z)


def rms(x, w, eps):
  return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def rope(x, theta):
  b, t, h, d = x.shape
  inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
  f = np.arange(t)[:, None] * inv[None]
  emb = np.concatenate([f, f], -1)[None, :, None, :]
  rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
  return x * np.cos(emb) + rot * np.sin(emb)


def forward(params, cfg, ids, hook=lambda x: x, down_rot=None, rots=None):
  """LLaDA logits (float64) with hook() applied to every block linear input, after the optional online
  transforms: down_rot [F, F] before down in every block, or rots = list per block of {tap: M}."""
  P = lambda a: np.asarray(a, np.float64)
  x = P(params["embed"])[np.asarray(ids)]
  b, t, _ = x.shape
  hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  for li, p in enumerate(params["blocks"]):
    p = {k: P(v) for k, v in p.items()}
    r = {k: P(v) for k, v in rots[li].items()} if rots is not None else {}
    if down_rot is not None:
      r["down"] = P(down_rot)
    m = lambda a, tap: a @ r[tap] if tap in r else a
    h = hook(m(rms(x, p["attn_norm"], cfg.norm_eps), "qkv"))
    q = rope((h @ p["q"].T).reshape(b, t, hq, d), cfg.rope_theta)
    k = rope((h @ p["k"].T).reshape(b, t, hkv, d), cfg.rope_theta)
    v = (h @ p["v"].T).reshape(b, t, hkv, d)
    a = np.zeros((b, t, hq, d))
    for j in range(hq):
      kj = j // (hq // hkv)
      s = np.einsum("bqd,bkd->bqk", q[:, :, j], k[:, :, kj]) / np.sqrt(d)
      s = np.exp(s - s.max(-1, keepdims=True))
      s /= s.sum(-1, keepdims=True)
      a[:, :, j] = np.einsum("bqk,bkd->bqd", s, v[:, :, kj])
    x = x + hook(m(a.reshape(b, t, hq * d), "o")) @ p["o"].T
    h2 = hook(m(rms(x, p["ff_norm"], cfg.norm_eps), "gate_up"))
    g = h2 @ p["gate"].T
    act = g / (1 + np.exp(-g)) * (h2 @ p["up"].T)
    x = x + hook(m(act, "down")) @ p["down"].T
  hd = P(params["embed"] if cfg.tie_embeddings else params["head"])
  return rms(x, P(params["final_norm"]), cfg.norm_eps) @ hd.T


def rtn_channel(w, bits, sym=False):
  """Per-output-channel min/max RTN with 0 in the range (GPTQ quantizer)."""
  w = np.asarray(w, np.float64)
  mx = 2 ** bits - 1
  lo = np.minimum(w.min(1, keepdims=True), 0)
  hi = np.maximum(w.max(1, keepdims=True), 0)
  if sym:
    hi = np.maximum(-lo, hi)
    lo = np.where(lo < 0, -hi, lo)
  s = (hi - lo) / mx
  z = np.full_like(s, (mx + 1) / 2) if sym else np.round(-lo / s)
  return s * (np.clip(np.round(w / s) + z, 0, mx) - z)
