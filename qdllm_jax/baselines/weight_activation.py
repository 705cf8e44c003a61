"""Weight-activation fake quantization (W8A8 / W4A4) of a params pytree (any family: LLaDA, Dream, BERT).

The activation quantizer (`fake_quant_per_token`, `ActQuant`) and the online input transforms live in
`models/act_fake_quant.py`, and `transformer.block_forward` applies them to every block linear's input, so a
W-A model is an ordinary `Model(params, config, act=ActQuant(...))` that the samplers, likelihood estimators
and the evaluation suite run unchanged. This module adds the weight side (`fake_quant_weights`: RTN per
channel or group) and two conveniences: `forward_actquant` (logits of params + rots under a_bits) and
`make_model` (the Model to evaluate).
"""
from __future__ import annotations

import jax.numpy as jnp

from qdllm_jax.errors import ConfigError, QuantizationError
from qdllm_jax.models.act_fake_quant import ONLINE, act_quant, check_bits, fake_quant_per_token, with_online
from qdllm_jax.models.families import family_of
from qdllm_jax.models.model import Model
from qdllm_jax.quant.rtn import rtn_quantize


def make_model(params: dict, cfg, a_bits=None, *, a_sym: bool = False, a_clip: float = 1.0, rots=None) -> Model:
  """Model computing  Q_a(x M_tap) W^T  at every block linear: params (weights already fake-quantized by the
  caller) with rots (list per block of {tap: [C, C]}, or None) stored as online transforms, and activations
  quantized per token to a_bits (None/16: full precision; a_sym: symmetric (QuaRot); a_clip: range ratio)."""
  return Model(with_online(params, rots), cfg, act_quant(a_bits, a_sym, a_clip))


def forward_actquant(params: dict, cfg, input_ids, a_bits=None, attention_mask=None, *, a_sym: bool = False,
                     a_clip: float = 1.0, rots=None):
  """Full model with per-token fake-quantized linear inputs: int32 [B, T] -> float32 logits [B, T, V].

  Args: as `make_model`; attention_mask optional [B, T] (Dream padding). Jitted through `transformer.forward_jit`.
  """
  return make_model(params, cfg, a_bits, a_sym=a_sym, a_clip=a_clip, rots=rots)(input_ids, attention_mask)


def require_prenorm_decoder(cfg, method: str, why: str) -> None:
  """ConfigError unless cfg's family is a pre-norm RMSNorm decoder (LLaDA, Dream): the baselines that fold
  scales or rotations into the norms before each linear group (`why`) do not apply to post-LN encoders (BERT)."""
  family = family_of(cfg)
  if family.norm_kind != "rms_pre":
    raise ConfigError(f"{method} does not apply to a {family.name!r} model (post-LN LayerNorm blocks): {why}. "
                      "Use RTN, GPTQ, AWQ or Quant-dLLM weights (W-A RTN: weight_activation.make_model) for this "
                      "family.")


def fake_quant_weights(params: dict, w_bits: int, *, group_size: int = -1, sym: bool = False,
                       linears=None) -> dict:
  """Params with every block linear replaced by its RTN fake-quantized copy W^ (same shape and dtype).

  W^ per (row, group) from `quant.rtn.rtn_quantize` (min/max grid with 0 inside, float32 scales);
  group_size -1 = per output channel. Embeddings, norms and the head are unchanged.
  Args:
    params: params pytree with dense [out, in] linears. w_bits: 2..8 (16: return params unchanged).
    linears: canonical names to quantize; None: every 2-D param of each block (its linears, any family).
  """
  check_bits(w_bits, "w_bits", allow_none=False)
  if w_bits >= 16:
    return params
  if w_bits > 8:
    raise QuantizationError(f"w_bits={w_bits} is not supported by RTN; expected 2..8 or 16 (no quantization).")
  blocks = []
  for p in params["blocks"]:
    p = dict(p)
    for n in (linears if linears is not None else [k for k in p if k != ONLINE and getattr(p[k], "ndim", 0) == 2]):
      w = p[n]
      g = group_size
      if g != -1 and w.shape[1] % g:
        raise QuantizationError(f"group_size={g} does not divide in_features={w.shape[1]} of {n!r}; use a "
                                f"divisor or -1 (per channel).")
      p[n] = rtn_quantize(w.astype(jnp.float32), bits=w_bits, group_size=g, sym=sym,
                          scale_dtype="float32")[3].astype(w.dtype)
    blocks.append(p)
  return dict(params, blocks=blocks)


__all__ = ["check_bits", "fake_quant_per_token", "make_model", "forward_actquant", "fake_quant_weights",
           "require_prenorm_decoder"]
