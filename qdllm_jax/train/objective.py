"""LLaDA's masked-diffusion training objectives (LLaDA, arXiv 2502.09992: the pretraining loss and
its SFT form; ML-GSAI/LLaDA GUIDELINES.md).

Pretraining, per sequence b:  t_b ~ U(0, 1),  p_b = (1 - eps) t_b + eps  (eps = 1e-3),
each token replaced by the mask id independently with probability p_b, and

    L_pre = sum_{b, i masked} CE(logits_{b,i}, x_{b,i}) / p_b  /  (B * L).

SFT (used for the task rows): the prompt is never masked; the answer region A_b (answer + EOS fill) is
masked as above and

    L_sft = (1 / B) sum_b [ sum_{i in A_b masked} CE_{b,i} / p_b ] / |A_b|.

Logits at position i predict token i (LLaDA, no shift).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qdllm_jax.models import transformer
from qdllm_jax.models.model_config import ModelConfig

EPS = 1e-3


def forward_mask(key: jax.Array, ids: jax.Array, mask_id: int, maskable: jax.Array | None = None,
                 eps: float = EPS):
  """The forward (noising) process: returns (noisy ids [B, L] int32, masked bool [B, L], p_mask f32 [B]).

  t ~ U(0,1) per row from fold_in(key, 0); u ~ U(0,1) per token from fold_in(key, 1);
  masked = (u < p_mask) & maskable.
  """
  b, l = ids.shape
  t = jax.random.uniform(jax.random.fold_in(key, 0), (b,), jnp.float32)
  p_mask = (1.0 - eps) * t + eps
  masked = jax.random.uniform(jax.random.fold_in(key, 1), (b, l), jnp.float32) < p_mask[:, None]
  if maskable is not None:
    masked = masked & maskable
  return jnp.where(masked, mask_id, ids).astype(ids.dtype), masked, p_mask


def token_ce(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """CE_{b,i} = logsumexp(logits_{b,i}) - logits_{b,i,x_{b,i}}: float32 [B, L] from logits [B, L, V]."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]


def pretrain_loss_from_logits(logits, ids, masked, p_mask):
  """L_pre = sum_{masked} CE / p_mask / (B * L): scalar float32."""
  b, l = ids.shape
  w = jnp.where(masked, 1.0 / p_mask[:, None], 0.0)
  return jnp.sum(token_ce(logits, ids) * w) / (b * l)


def sft_loss_from_logits(logits, ids, masked, p_mask, answer_mask):
  """L_sft = mean_b [ sum_{masked in answer} CE / p_mask ] / |answer_b|: scalar float32."""
  w = jnp.where(masked & answer_mask, 1.0 / p_mask[:, None], 0.0)
  per_row = jnp.sum(token_ce(logits, ids) * w, axis=-1) / jnp.maximum(jnp.sum(answer_mask, axis=-1), 1)
  return jnp.mean(per_row)


def pretrain_loss(params: dict, cfg: ModelConfig, ids: jax.Array, key: jax.Array) -> jax.Array:
  """Noise ids [B, L] with `forward_mask`, run the model, return L_pre (scalar)."""
  noisy, masked, p_mask = forward_mask(key, ids, cfg.mask_id)
  return pretrain_loss_from_logits(transformer.forward(params, cfg, noisy), ids, masked, p_mask)


def sft_loss(params: dict, cfg: ModelConfig, ids: jax.Array, key_mask: jax.Array, answer_mask: jax.Array,
             key: jax.Array) -> jax.Array:
  """Noise only the answer region of EOS-padded rows ids [B, T] (padding keys hidden), return L_sft."""
  noisy, masked, p_mask = forward_mask(key, ids, cfg.mask_id, maskable=answer_mask)
  logits = transformer.forward(params, cfg, noisy, attention_mask=key_mask)
  return sft_loss_from_logits(logits, ids, masked, p_mask, answer_mask)
