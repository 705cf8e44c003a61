"""AWQ (arXiv 2306.00978) weight-only quantization as llm-awq runs it on LLaDA
(arXiv 2508.14896, experimental setup; FelixMessi/QDLM scripts).

Pseudo-quantizer (llm-awq `pseudo_quantize_tensor`, zero point on), per (row, group of g columns):
    s = max(max w - min w, 1e-5) / (2^b - 1),  z = clamp(-round(min w / s), 0, 2^b - 1)
    w^ = s (clamp(round(w / s) + z, 0, 2^b - 1) - z)
Scale search, per scaling group (prev op -> linears reading X, LLaDA mapping):
    attn_norm -> q/k/v (inspect: attention sub-layer incl. o),  v -> o (MHA only; inspect: o),
    ff_norm -> gate/up (inspect: SwiGLU MLP incl. down),          up -> down (inspect: down).
    s_x = mean_t |X_t|  [C];  for a in {0, 1/n, ..., (n-1)/n}:  s = max(s_x^a, 1e-4), s <- s / sqrt(max s min s)
    loss(a) = mean((f(X; W) - f(X; Q(W diag s) diag(s)^-1))^2);  s* = s(argmin_a loss)
    fold: prev <- prev / s* (norm weight, or the rows of v / up), W <- W diag(s*).
All four scales are searched on the FP block's inputs (the folding keeps the function), then applied.
Clip search (`auto_clip`, all linears except q and k): per (row, group), with X the scaled input
    m_i = max|w| (1 - i/20), i = 0..9; err_i = mean_t (sum_{k in group} x_tk (Q(clamp(w, -m_i, m_i))_k - w_k))^2
    w <- clamp(w, -m*, m*) with m* the m_i of least error (first on ties).
Finally every block linear is pseudo-quantized. Embeddings and the head stay in full precision.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.baselines import weight_activation
from qdllm_jax.errors import QuantizationError
from qdllm_jax.models import layers, transformer

# (name / tap, prev op, linears)
SCALE_GROUPS = (("qkv", "attn_norm", ("q", "k", "v")), ("o", "v", ("o",)),
                ("gate_up", "ff_norm", ("gate", "up")), ("down", "up", ("down",)))
NO_CLIP = ("q", "k")


def pseudo_quantize(w: jax.Array, bits: int, group_size: int) -> jax.Array:
  """llm-awq asymmetric group pseudo-quantization w -> w^ (module docstring). w: float [out, in] -> same."""
  out, n = w.shape
  g = n if group_size == -1 else group_size
  maxq = 2 ** bits - 1
  wg = w.astype(jnp.float32).reshape(out, n // g, g)
  lo, hi = jnp.min(wg, -1, keepdims=True), jnp.max(wg, -1, keepdims=True)
  s = jnp.maximum(hi - lo, 1e-5) / maxq
  z = jnp.clip(-jnp.round(lo / s), 0, maxq)
  return (s * (jnp.clip(jnp.round(wg / s) + z, 0, maxq) - z)).reshape(out, n).astype(w.dtype)


def _inspect(name, p, ws, h, cfg, cos, sin):
  """The output the scale search compares: attention / MLP sub-layer for qkv / gate_up, the linear else."""
  if name == "qkv":
    b, t, _ = h.shape
    q = layers.linear(h, ws[0], p.get("q_bias")).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = layers.linear(h, ws[1], p.get("k_bias")).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = layers.linear(h, ws[2], p.get("v_bias")).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    q = layers.apply_rope(q, cos, sin, cfg.rope_full_precision)
    k = layers.apply_rope(k, cos, sin, cfg.rope_full_precision)
    return layers.linear(layers.attention(q, k, v, None).reshape(b, t, cfg.q_dim), p["o"])
  if name == "gate_up":
    return layers.swiglu(h, ws[0], ws[1], p["down"])[0]
  return layers.linear(h, ws[0])


@functools.partial(jax.jit, static_argnames=("name", "cfg", "bits", "group_size", "n_grid"))
def scale_search(p, h, cos, sin, *, name, cfg, bits, group_size, n_grid=20):
  """Grid losses of one scaling group.

  Args:
    p: block params. h: float [B, T, C] the group's input (tap `name`). cos/sin: [B, T, head_dim].
  Returns:
    (losses float32 [n_grid] for a = i/n_grid, s_x float32 [C] = mean_t |h_t|).
  """
  names = dict((g, l) for g, _, l in SCALE_GROUPS)[name]
  ws = [p[n].astype(jnp.float32) for n in names]
  h = h.astype(jnp.float32)
  org = _inspect(name, p, ws, h, cfg, cos, sin)
  s_x = jnp.mean(jnp.abs(h.reshape(-1, h.shape[-1])), axis=0)

  def loss(a):
    s = jnp.maximum(s_x ** a, 1e-4)
    s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
    wq = [pseudo_quantize(w * s[None, :], bits, group_size) / s[None, :] for w in ws]
    return jnp.mean((org - _inspect(name, p, wq, h, cfg, cos, sin)) ** 2)

  return jax.lax.map(loss, jnp.arange(n_grid, dtype=jnp.float32) / n_grid), s_x


def best_scale(losses, s_x, n_grid: int = 20) -> tuple[jax.Array, float]:
  """s* for the first a minimising the loss; returns (s* float32 [C], a)."""
  a = float(np.argmin(np.asarray(losses))) / n_grid
  s = jnp.maximum(s_x ** a, 1e-4)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s)), a


def fold_scales(p: dict, scales: dict) -> dict:
  """prev <- prev / s (norm weight or rows of v / up, with bias), W <- W diag(s) for each group in `scales`."""
  p = dict(p)
  for name, prev, names in SCALE_GROUPS:
    if name not in scales:
      continue
    s = scales[name].astype(jnp.float32)
    if p[prev].ndim == 1:
      p[prev] = (p[prev].astype(jnp.float32) / s).astype(p[prev].dtype)
    else:
      p[prev] = (p[prev].astype(jnp.float32) / s[:, None]).astype(p[prev].dtype)
      if p.get(prev + "_bias") is not None:
        p[prev + "_bias"] = (p[prev + "_bias"].astype(jnp.float32) / s).astype(p[prev + "_bias"].dtype)
    for n in names:
      p[n] = (p[n].astype(jnp.float32) * s[None, :]).astype(p[n].dtype)
  return p


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "n_grid", "max_shrink"))
def clip_search(w, x, *, bits, group_size, n_grid=20, max_shrink=0.5):
  """Per (row, group) clip value m* of llm-awq's auto_clip (module docstring).

  Args:
    w: float [out, in]. x: float [T, in] sampled input tokens.
  Returns:
    (m* float32 [out, G], errors float32 [n_shrink, out, G]).
  """
  out, n = w.shape
  g = n if group_size == -1 else group_size
  wg = w.astype(jnp.float32).reshape(out, n // g, g)
  xg = x.astype(jnp.float32).reshape(-1, n // g, g)
  org_max = jnp.max(jnp.abs(wg), -1)
  org_out = jnp.einsum("tGk,oGk->otG", xg, wg)

  def err(i):
    m = org_max * (1.0 - i / n_grid)
    q = pseudo_quantize(jnp.clip(wg, -m[..., None], m[..., None]).reshape(out, n), bits, group_size)
    return jnp.mean((jnp.einsum("tGk,oGk->otG", xg, q.reshape(wg.shape)) - org_out) ** 2, axis=1)

  errs = jax.lax.map(err, jnp.arange(int(max_shrink * n_grid), dtype=jnp.float32))
  best = jnp.argmin(errs, axis=0)  # first minimum
  return org_max * (1.0 - best / n_grid), errs


def apply_clip(w, m, group_size: int):
  """w <- clamp(w, -m, m) per (row, group); w [out, in], m [out, G]."""
  out, n = w.shape
  g = n if group_size == -1 else group_size
  wg = w.reshape(out, n // g, g)
  return jnp.clip(wg, -m[..., None].astype(w.dtype), m[..., None].astype(w.dtype)).reshape(out, n)


def awq_block(p: dict, x, cfg, *, bits: int, group_size: int, n_grid: int = 20, clip: bool = True,
              n_clip_tokens: int = 512):
  """Scale search + folding (+ clip search) of one block on its FP inputs x [N, L, D].

  Returns (p_scaled_clipped (dense, not yet quantized), {group: a}, FP block output [N, L, D]).
  """
  b, t, _ = x.shape
  pos, _ = transformer.positions_and_mask(cfg, jnp.zeros((b, t), jnp.int32), None)
  cos, sin = layers.rope_tables(pos, cfg.head_dim, cfg.rope_theta)
  out, taps = transformer.block_forward(p, x, cfg, cos, sin, None, return_taps=True)
  scales, ratios = {}, {}
  for name, prev, _ in SCALE_GROUPS:
    if name == "o" and cfg.q_dim != cfg.kv_dim:
      continue  # GQA: v's rows do not map one-to-one onto o's input channels
    losses, s_x = scale_search(p, taps[name], cos, sin, name=name, cfg=cfg, bits=bits, group_size=group_size,
                               n_grid=n_grid)
    scales[name], ratios[name] = best_scale(losses, s_x, n_grid)
  ps = fold_scales(p, scales)
  if clip:
    for name, _, names in SCALE_GROUPS:
      xs = taps[name].reshape(-1, taps[name].shape[-1]).astype(jnp.float32)
      if name in scales:
        xs = xs / scales[name][None, :]
      xs = xs[::max(1, xs.shape[0] // n_clip_tokens)]
      for n in names:
        if n in NO_CLIP:
          continue
        m, _ = clip_search(ps[n], xs, bits=bits, group_size=group_size, n_grid=n_grid)
        ps[n] = apply_clip(ps[n], m, group_size)
  return ps, ratios, out


def awq(params: dict, cfg, calib_ids, *, w_bits: int = 4, group_size: int = 128, n_grid: int = 20,
        clip: bool = True, quantize: bool = True):
  """AWQ W{w_bits}A16 of a whole model on calibration windows calib_ids int [N, L].

  Returns (params with every block linear scaled, clipped and (if quantize) pseudo-quantized,
  list per block of {group: chosen a}).
  """
  weight_activation.require_prenorm_decoder(
      cfg, "AWQ",
      "its scales are folded into the RMSNorm weight before q/k/v and gate/up and into v before o (arXiv "
      "2306.00978 §3.2); a post-LN block has no norm in front of its linears")
  weight_activation.check_bits(w_bits, "w_bits", allow_none=False)
  if w_bits > 8:
    raise QuantizationError(f"w_bits={w_bits} is not supported by AWQ; expected 2..8.")
  ids = jnp.asarray(calib_ids)
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise QuantizationError(f"calib_ids must be int [N, L]; got shape {ids.shape}, dtype {ids.dtype}.")
  for n in transformer.LINEARS:
    c = params["blocks"][0][n].shape[1]
    if group_size != -1 and (group_size <= 0 or c % group_size):
      raise QuantizationError(f"group_size={group_size} does not divide in_features={c} of {n!r}; use a "
                              f"divisor (128 for LLaDA/Dream) or -1.")
  x = transformer.embed(params, ids)
  blocks, ratios = [], []
  for p in params["blocks"]:
    ps, r, x = awq_block(p, x, cfg, bits=w_bits, group_size=group_size, n_grid=n_grid, clip=clip)
    if quantize:
      ps = dict(ps, **{n: pseudo_quantize(ps[n], w_bits, group_size) for n in transformer.LINEARS})
    blocks.append(ps)
    ratios.append(r)
  return dict(params, blocks=blocks), ratios


__all__ = ["SCALE_GROUPS", "pseudo_quantize", "scale_search", "best_scale", "fold_scales", "clip_search",
           "apply_clip", "awq_block", "awq"]
