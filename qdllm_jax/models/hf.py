"""Hugging Face tensor names <-> the canonical params pytree (the one place names are mapped).

Orientation: the project keeps every linear weight in the HF/PyTorch orientation `[out, in]`
(no transpose anywhere; `layers.linear` computes x @ W^T). So loading and saving are pure renames,
and a round trip is bit-exact.
"""
from __future__ import annotations

from qdllm_jax.models.config import ModelConfig

_LLADA_BLOCK = {"attn_norm": "attn_norm.weight", "q": "q_proj.weight", "k": "k_proj.weight",
                "v": "v_proj.weight", "o": "attn_out.weight", "ff_norm": "ff_norm.weight",
                "gate": "ff_proj.weight", "up": "up_proj.weight", "down": "ff_out.weight",
                "q_bias": "q_proj.bias", "k_bias": "k_proj.bias", "v_bias": "v_proj.bias"}
_DREAM_BLOCK = {"attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight",
                "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
                "ff_norm": "post_attention_layernorm.weight", "gate": "mlp.gate_proj.weight",
                "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight", "q_bias": "self_attn.q_proj.bias",
                "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias"}
_TOP = {"llada": {"embed": "model.transformer.wte.weight", "final_norm": "model.transformer.ln_f.weight",
                  "head": "model.transformer.ff_out.weight"},
        "dream": {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "head": "lm_head.weight"}}
_BLOCK_PREFIX = {"llada": "model.transformer.blocks.{}.", "dream": "model.layers.{}."}


def block_names(cfg: ModelConfig, layer: int) -> dict[str, str]:
  """{canonical name: HF tensor name} for the params of block `layer` present in this config."""
  table = _LLADA_BLOCK if cfg.arch == "llada" else _DREAM_BLOCK
  prefix = _BLOCK_PREFIX[cfg.arch].format(layer)
  return {k: prefix + v for k, v in table.items() if cfg.qkv_bias or not k.endswith("_bias")}


def top_names(cfg: ModelConfig) -> dict[str, str]:
  """{canonical name: HF tensor name} for the non-block params (embedding, final norm, head)."""
  names = dict(_TOP[cfg.arch])
  if cfg.tie_embeddings:
    names.pop("head")
  return names


def module_path(cfg: ModelConfig, layer: int, name: str) -> str:
  """The HF module path of a block linear (e.g. 'model.transformer.blocks.3.q_proj'), used by rules tables."""
  return block_names(cfg, layer)[name].rsplit(".", 1)[0]


def all_names(cfg: ModelConfig) -> dict[str, tuple]:
  """{HF tensor name: canonical path} where a path is ("embed",) or ("blocks", i, "q")."""
  out = {hf: (k,) for k, hf in top_names(cfg).items()}
  for i in range(cfg.n_layers):
    out.update({hf: ("blocks", i, k) for k, hf in block_names(cfg, i).items()})
  return out
