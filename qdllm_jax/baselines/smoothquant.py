"""SmoothQuant (arXiv 2211.10438) as run by the dLLM PTQ study
(arXiv 2508.14896, experimental setup; FelixMessi/QDLM scripts).

Per block and per input channel j of the q/k/v group and of the gate/up group:
    s_j = max|X_j|^alpha / max_{W in group, o} |W_{o j}|^(1 - alpha)     (alpha = 0.5; s_j >= 1e-5)
    X' = X diag(s)^-1   (folded into the preceding RMSNorm weight: attn_norm -> q/k/v, ff_norm -> gate/up)
    W' = W diag(s)      (column j of every linear reading X scaled by s_j)
and, given the model config, v -> o as the OmniQuant/DuQuant LLaMA layers do (`smooth_fc_fc`): per kv channel c
(with GQA the max runs over the query heads sharing it) s_c = max|A_c|^alpha / max|W_o[:, c]|^(1 - alpha),
W_v[c, :] /= s_c (and its bias), W_o[:, c] *= s_c; attention mixes tokens, not channels, so o's input is divided
by s exactly. q -> k smoothing only matters when QK^T is quantized, which this study's setting does not do.
max|X_j| is taken over all calibration tokens (plain unmasked text, one bidirectional pass each).
The folded model computes the same function in exact arithmetic. Weights are then RTN-quantized per
output channel and activations per token (asymmetric) with `weight_activation.forward_actquant`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qdllm_jax.baselines import weight_activation
from qdllm_jax.baselines.study_method import StudyMethod
from qdllm_jax.errors import QuantizationError
from qdllm_jax.models import layers, transformer

# (RMSNorm weight, linears reading its output, tap name) pairs that SmoothQuant folds.
SMOOTH_GROUPS = (("attn_norm", ("q", "k", "v"), "qkv"), ("ff_norm", ("gate", "up"), "gate_up"))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _absmax_pass(params, cfg, input_ids, attention_mask):
  """Per block {tap: float32 [c] max over tokens of |x|} for one batch."""
  pos, key_mask = transformer.positions_and_mask(cfg, input_ids, attention_mask)
  cos, sin = layers.rope_tables(pos, cfg.head_dim, cfg.rope_theta)
  x = transformer.embed(params, input_ids)
  out = []
  valid = None if key_mask is None else key_mask[..., None]
  for p in params["blocks"]:
    x, taps = transformer.block_forward(p, x, cfg, cos, sin, key_mask, return_taps=True)
    st = {}
    for g, a in taps.items():
      a = jnp.abs(a.astype(jnp.float32))
      if valid is not None:
        a = jnp.where(valid, a, 0.0)
      st[g] = jnp.max(a, axis=(0, 1))
    out.append(st)
  return out


def collect_act_absmax(params: dict, cfg, calib_ids, batch_size: int = 8, attention_mask=None) -> list:
  """max_t |X_{t, j}| per block and tap over the calibration set.

  Args:
    params: FP params pytree. cfg: ModelConfig. calib_ids: int [N, L] token windows.
    batch_size: sequences per jitted pass. attention_mask: optional [N, L] (padding excluded).
  Returns:
    list (n_layers) of {"qkv": [D], "o": [Hq*d], "gate_up": [D], "down": [F]} float32 arrays.
  """
  weight_activation.require_prenorm_decoder(
      cfg, "SmoothQuant",
      "its per-channel scales are folded into the RMSNorm before each linear group (arXiv 2211.10438 §4) and its "
      "activation pass runs the decoder block")
  ids = jnp.asarray(calib_ids)
  if ids.ndim != 2 or ids.shape[0] == 0 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise QuantizationError(f"calib_ids must be a non-empty int array [N, L]; got shape {ids.shape}, dtype "
                            f"{ids.dtype}. Tokenize the calibration windows first.")
  res = None
  for s in range(0, ids.shape[0], batch_size):
    m = None if attention_mask is None else jnp.asarray(attention_mask[s:s + batch_size])
    r = _absmax_pass(params, cfg, ids[s:s + batch_size], m)
    res = r if res is None else jax.tree.map(jnp.maximum, res, r)
  return res


def smooth_scales(act_absmax: jax.Array, weights, alpha: float = 0.5) -> jax.Array:
  """s_j = max|X_j|^alpha / max_o |W_{oj}|^(1-alpha) over the concatenated weights, clamped to >= 1e-5.

  Args:
    act_absmax: float [C]. weights: list of float [out_i, C]. alpha: migration strength in [0, 1].
  Returns:
    float32 [C].
  """
  if not 0.0 <= alpha <= 1.0:
    raise QuantizationError(f"alpha={alpha} must lie in [0, 1] (the study uses 0.5).")
  wmax = jnp.max(jnp.stack([jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0) for w in weights]), axis=0)
  a = jnp.maximum(act_absmax.astype(jnp.float32), 1e-5)
  s = a ** alpha / jnp.maximum(wmax, 1e-5) ** (1.0 - alpha)
  return jnp.maximum(s, 1e-5)


def _v_to_o(p: dict, o_absmax, cfg, alpha: float):
  """v -> o smoothing of one block (module docstring). Returns (params, s over the kv channels [Hkv d])."""
  rep, d = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
  group = lambda v: jnp.max(v.reshape(cfg.n_kv_heads, rep, d), axis=1).reshape(-1)  # noqa: E731
  s = smooth_scales(group(o_absmax), [group(jnp.max(jnp.abs(p["o"].astype(jnp.float32)), axis=0))[None, :]], alpha)
  s_o = jnp.broadcast_to(s.reshape(cfg.n_kv_heads, 1, d), (cfg.n_kv_heads, rep, d)).reshape(-1)
  p = dict(p, v=(p["v"].astype(jnp.float32) / s[:, None]).astype(p["v"].dtype),
           o=(p["o"].astype(jnp.float32) * s_o[None, :]).astype(p["o"].dtype))
  if p.get("v_bias") is not None:
    p["v_bias"] = (p["v_bias"].astype(jnp.float32) / s).astype(p["v_bias"].dtype)
  return p, s


def smooth_params(params: dict, act_absmax: list, alpha: float = 0.5, cfg=None) -> tuple[dict, list]:
  """Fold the smoothing scales: norm_w <- norm_w / s, W <- W diag(s) for each group in SMOOTH_GROUPS, and
  v -> o when `cfg` (the ModelConfig, for the head layout) is given.

  Args:
    params: FP params pytree. act_absmax: output of `collect_act_absmax`. cfg: ModelConfig or None.
  Returns:
    (smoothed params, list per block of {tap: s [C]} (tap "o": s over the kv channels)).
  """
  if len(act_absmax) != len(params["blocks"]):
    raise QuantizationError(f"act_absmax has {len(act_absmax)} blocks; the model has {len(params['blocks'])}. "
                            f"Collect the statistics on this model.")
  blocks, scales = [], []
  for p, st in zip(params["blocks"], act_absmax):
    p, sc = dict(p), {}
    for norm, names, tap in SMOOTH_GROUPS:
      s = smooth_scales(st[tap], [p[n] for n in names], alpha)
      p[norm] = (p[norm].astype(jnp.float32) / s).astype(p[norm].dtype)
      for n in names:
        p[n] = (p[n].astype(jnp.float32) * s[None, :]).astype(p[n].dtype)
      sc[tap] = s
    if cfg is not None:
      p, sc["o"] = _v_to_o(p, st["o"], cfg, alpha)
    blocks.append(p)
    scales.append(sc)
  return dict(params, blocks=blocks), scales


def smoothquant(params: dict, cfg, calib_ids, *, w_bits: int = 8, alpha: float = 0.5, smooth: bool = True,
                batch_size: int = 8) -> dict:
  """SmoothQuant W{w_bits}: smoothing (optional) then per-channel asymmetric RTN of every block linear.

  Run the result with `weight_activation.forward_actquant(qparams, cfg, ids, a_bits)` (per-token asymmetric A).
  Returns the fake-quantized params pytree (same structure and dtypes as `params`).
  """
  weight_activation.check_bits(w_bits, "w_bits", allow_none=False)
  if smooth:
    params, _ = smooth_params(params, collect_act_absmax(params, cfg, calib_ids, batch_size), alpha, cfg)
  return weight_activation.fake_quant_weights(params, w_bits, group_size=-1, sym=False)


def _study_build(model, calib_ids, w_bits, a_bits, settings, key):
  """The study's SmoothQuant W{w_bits}A{a_bits} entry (per-token asymmetric activations)."""
  del key
  qp = smoothquant(model.params, model.config, calib_ids, w_bits=w_bits, alpha=settings["smoothquant"]["alpha"])
  return weight_activation.make_model(qp, model.config, a_bits)


STUDY_METHOD = StudyMethod(name="smoothquant", weight_activation=True, sections=("smoothquant",),
                           build=_study_build)

__all__ = ["STUDY_METHOD", "SMOOTH_GROUPS", "collect_act_absmax", "smooth_scales", "smooth_params", "smoothquant"]
