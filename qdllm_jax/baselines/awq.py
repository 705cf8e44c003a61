"""AWQ (arXiv 2306.00978) weight-only quantization as llm-awq runs it on LLaDA
(arXiv 2508.14896, experimental setup; FelixMessi/QDLM scripts), and on BERT encoders with online divisors.

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
Where each scale goes is the model family's `scale_folds` (models/family.py): {tap: prev op, or None}.
Families without llm-awq's sub-module mapping (BERT, post-LN: q/k/v's and up's inputs also feed the residual,
GELU sits between up and down, so only v -> o folds):
    prev None: W <- W diag(s*) and the tap's input is multiplied online by 1/s* (p["online"][tap] = 1/s*, a
      vector [C]; llm-awq's `ScaledActivation` for GELU MLPs, generalised to every unfoldable group);
    loss(a) = mean((B(x; p) - B(x; p with the group's W -> Q(W diag s) diag(s)^-1))^2), B the whole block
      (family.block_forward) on its FP input x, every other linear in FP (a family-generic objective: the
      block output is what the next block reads).
  The online divisors are side data of C float32 values per scaled group per block (BERT: 2 d + F per block),
  counted by `online_nbytes`.
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
from qdllm_jax.baselines.study_method import StudyMethod
from qdllm_jax.errors import QuantizationError
from qdllm_jax.models import layers, llada
from qdllm_jax.models.act_fake_quant import ONLINE
from qdllm_jax.models.families import family_of
from qdllm_jax.quant import packed, rtn

NO_CLIP = ("q", "k")


def scale_groups(family) -> tuple:
  """((tap, prev op or None, linears), ...) of a family, in block order: its linear groups that `scale_folds`
  lists (prev None: the scale stays an online divisor)."""
  return tuple((t, family.scale_folds[t], tuple(n)) for t, n in family.linear_groups.items()
               if t in family.scale_folds)


# (name / tap, prev op, linears) of the pre-norm decoders (LLaDA, Dream)
SCALE_GROUPS = scale_groups(llada.FAMILY)


def group_grid(wg: jax.Array, bits: int, scale_dtype=None) -> tuple[jax.Array, jax.Array]:
  """llm-awq's (scale, zero) [rows, G, 1] of wg float32 [rows, G, g] (module docstring); the scale rounded to
  scale_dtype first (None: unrounded)."""
  maxq = 2 ** bits - 1
  lo, hi = jnp.min(wg, -1, keepdims=True), jnp.max(wg, -1, keepdims=True)
  s = rtn.round_scale(jnp.maximum(hi - lo, 1e-5) / maxq, scale_dtype)
  return s, jnp.clip(-jnp.round(lo / s), 0, maxq)


def pseudo_quantize(w: jax.Array, bits: int, group_size: int) -> jax.Array:
  """llm-awq asymmetric group pseudo-quantization w -> w^ (module docstring). w: float [out, in] -> same."""
  out, n = w.shape
  g = n if group_size == -1 else group_size
  wg = w.astype(jnp.float32).reshape(out, n // g, g)
  s, z = group_grid(wg, bits)
  return (s * (rtn.quantize_codes(wg, s, z, bits) - z)).reshape(out, n).astype(w.dtype)


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


def grid_scale(s_x, a):
  """s = max(s_x^a, 1e-4) / sqrt(max s min s): the scale of grid point a (float32 [C])."""
  s = jnp.maximum(s_x ** a, 1e-4)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("name", "cfg", "bits", "group_size", "n_grid"))
def scale_search(p, h, cos, sin, *, name, cfg, bits, group_size, n_grid=20):
  """Grid losses of one scaling group of a pre-norm decoder (llm-awq's inspected sub-module, `_inspect`).

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
    s = grid_scale(s_x, a)
    wq = [pseudo_quantize(w * s[None, :], bits, group_size) / s[None, :] for w in ws]
    return jnp.mean((org - _inspect(name, p, wq, h, cfg, cos, sin)) ** 2)

  return jax.lax.map(loss, jnp.arange(n_grid, dtype=jnp.float32) / n_grid), s_x


@functools.partial(jax.jit, static_argnames=("names", "cfg", "bits", "group_size", "n_grid"))
def block_scale_search(p, x, h, ctx, *, names, cfg, bits, group_size, n_grid=20):
  """Grid losses of one scaling group measured on the whole block output (families without llm-awq's mapping).

  Args:
    p: block params (float). x: float [B, T, D] the block's FP input. h: float [B, T, C] the group's input (its
    tap). ctx: the family's block_context. names: the group's linears.
  Returns:
    (losses float32 [n_grid]: mean((B(x; p) - B(x; p with W -> Q(W diag s) diag(s)^-1 for W in names))^2),
     s_x float32 [C] = mean_t |h_t|).
  """
  family = family_of(cfg)
  p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
  x = x.astype(jnp.float32)
  org = family.block_forward(p, x, cfg, ctx)
  s_x = jnp.mean(jnp.abs(h.reshape(-1, h.shape[-1]).astype(jnp.float32)), axis=0)

  def loss(a):
    s = grid_scale(s_x, a)
    pq = dict(p, **{n: pseudo_quantize(p[n] * s[None, :], bits, group_size) / s[None, :] for n in names})
    return jnp.mean((org - family.block_forward(pq, x, cfg, ctx)) ** 2)

  return jax.lax.map(loss, jnp.arange(n_grid, dtype=jnp.float32) / n_grid), s_x


def best_scale(losses, s_x, n_grid: int = 20) -> tuple[jax.Array, float]:
  """s* for the first a minimising the loss; returns (s* float32 [C], a)."""
  a = float(np.argmin(np.asarray(losses))) / n_grid
  return grid_scale(s_x, a), a


def fold_scales(p: dict, scales: dict, groups: tuple = SCALE_GROUPS) -> dict:
  """W <- W diag(s) for each group in `scales` ({tap: float [C]}), and prev <- prev / s (norm weight or rows of
  v / up, with bias), or, where prev is None, the online divisor p["online"][tap] <- (existing transform) * 1/s
  (a vector [C]; composed with an existing matrix M as M diag(1/s)). groups: `scale_groups(family)`."""
  p = dict(p)
  for name, prev, names in groups:
    if name not in scales:
      continue
    s = scales[name].astype(jnp.float32)
    if prev is None:
      online = dict(p.get(ONLINE, {}))
      r = online.get(name)
      inv = 1.0 / s
      online[name] = inv if r is None else (r.astype(jnp.float32) * (inv if r.ndim == 1 else inv[None, :]))
      p[ONLINE] = online
    elif p[prev].ndim == 1:
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

  Returns (p_scaled_clipped (dense, not yet quantized; online divisors under p["online"] where a scale does not
  fold), {group: a}, FP block output [N, L, D]).
  """
  family = family_of(cfg)
  groups = scale_groups(family)
  b, t, _ = x.shape
  ctx = family.block_context(cfg, b, t, None)
  out, taps = family.block_forward(p, x, cfg, ctx, return_taps=True)
  scales, ratios = {}, {}
  for name, prev, names in groups:
    if prev == "v" and cfg.q_dim != cfg.kv_dim:
      continue  # GQA: v's rows do not map one-to-one onto o's input channels
    if family.norm_kind == "rms_pre":  # llm-awq's inspected sub-modules
      cos, sin, _ = ctx
      losses, s_x = scale_search(p, taps[name], cos, sin, name=name, cfg=cfg, bits=bits, group_size=group_size,
                                 n_grid=n_grid)
    else:
      losses, s_x = block_scale_search(p, x, taps[name], ctx, names=names, cfg=cfg, bits=bits,
                                       group_size=group_size, n_grid=n_grid)
    scales[name], ratios[name] = best_scale(losses, s_x, n_grid)
  ps = fold_scales(p, scales, groups)
  if clip:
    for name, _, names in groups:
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
  """AWQ W{w_bits}A16 of a whole model (any family with `scale_folds`) on calibration windows calib_ids int [N, L].

  Returns (params with every block linear scaled, clipped and (if quantize) pseudo-quantized, the unfoldable
  scales as online divisors p["online"][tap] float32 [C]; list per block of {group: chosen a}).
  """
  family = family_of(cfg)
  if not family.scale_folds:
    raise QuantizationError(f"AWQ has no scale groups for a {family.name!r} model: its family declares no "
                            "`scale_folds` (models/family.py); add them to the family module.")
  weight_activation.check_bits(w_bits, "w_bits", allow_none=False)
  if w_bits > 8:
    raise QuantizationError(f"w_bits={w_bits} is not supported by AWQ; expected 2..8.")
  ids = jnp.asarray(calib_ids)
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise QuantizationError(f"calib_ids must be int [N, L]; got shape {ids.shape}, dtype {ids.dtype}.")
  for n in family.linears:
    c = params["blocks"][0][n].shape[1]
    if group_size != -1 and (group_size <= 0 or c % group_size):
      raise QuantizationError(f"group_size={group_size} does not divide in_features={c} of {n!r}; use a "
                              f"divisor (128 for LLaDA/Dream/MiniLM) or -1.")
  x = family.embed(params, ids, cfg)
  blocks, ratios = [], []
  for p in params["blocks"]:
    ps, r, x = awq_block(p, x, cfg, bits=w_bits, group_size=group_size, n_grid=n_grid, clip=clip)
    if quantize:
      ps = dict(ps, **{n: pseudo_quantize(ps[n], w_bits, group_size) for n in family.linears})
    blocks.append(ps)
    ratios.append(r)
  return dict(params, blocks=blocks), ratios


def pack_weight(w, bits: int, group_size: int, scale_dtype: str = "float16") -> packed.UniformWeight:
  """The packed uniform weight (quant/packed.py) of llm-awq's quantizer of w float [out, in] (clipped and scaled,
  i.e. `awq(..., quantize=False)`'s linears): the module's grid with the scale rounded to scale_dtype before the
  zero point and the codes (as llm-awq's float16 models compute it), zeros uint8. Its dequantization is what it
  stores; `bits_per_weight` counts codes, scales and zeros."""
  out, n = w.shape
  g = n if group_size == -1 else group_size
  wg = jnp.asarray(w, jnp.float32).reshape(out, n // g, g)
  s, z = group_grid(wg, bits, scale_dtype)
  q = rtn.quantize_codes(wg, s, z, bits).reshape(out, n).astype(jnp.uint8)
  return packed.from_uniform(q, s[..., 0], z[..., 0], bits=bits, group_size=group_size, sym=False,
                             scale_dtype=scale_dtype, method="awq")


def online_nbytes(params: dict) -> int:
  """Bytes of every block's online transforms (AWQ's divisors: C float32 values per unfoldable group)."""
  return int(sum(np.prod(v.shape) * jnp.dtype(v.dtype).itemsize for p in params["blocks"]
                 for v in p.get(ONLINE, {}).values()))


def _study_build(model, calib_ids, w_bits, a_bits, settings, key):
  """The study's AWQ W{w_bits}A16 entry: groups from `weight_only`, the search settings from `awq`."""
  del a_bits, key
  qp = awq(model.params, model.config, calib_ids, w_bits=w_bits, group_size=settings["weight_only"]["group_size"],
           **settings["awq"])[0]
  return weight_activation.make_model(qp, model.config)


STUDY_METHOD = StudyMethod(name="awq", weight_activation=False, sections=("awq", "weight_only"), build=_study_build)

__all__ = ["STUDY_METHOD", "SCALE_GROUPS", "scale_groups", "group_grid", "pseudo_quantize", "grid_scale",
           "scale_search", "block_scale_search", "best_scale", "fold_scales", "clip_search", "apply_clip", "awq_block",
           "awq", "pack_weight", "online_nbytes"]
