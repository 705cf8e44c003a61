"""Hugging Face tensor names <-> the canonical params pytree, through the model's family (models/families.py).

Orientation: the project keeps every linear weight in the HF/PyTorch orientation `[out, in]`
(no transpose anywhere; `layers.linear` computes x @ W^T). So loading and saving are pure renames,
and a round trip is bit-exact. The name tables live in the family modules (llada.py, dream.py, bert.py).
"""
from __future__ import annotations

from qdllm_jax.models.families import family_of
from qdllm_jax.models.model_config import ModelConfig


def block_names(cfg: ModelConfig, layer: int) -> dict[str, str]:
  """{canonical name: HF tensor name} for the params of block `layer` present in this config."""
  return family_of(cfg).block_names(cfg, layer)


def top_names(cfg: ModelConfig) -> dict[str, str]:
  """{canonical name: HF tensor name} for the non-block params (embeddings, final norm, head)."""
  return family_of(cfg).top_names(cfg)


def module_path(cfg: ModelConfig, layer: int, name: str) -> str:
  """The HF module path of a block linear (e.g. 'model.transformer.blocks.3.q_proj'), used by rules tables."""
  return block_names(cfg, layer)[name].rsplit(".", 1)[0]


def all_names(cfg: ModelConfig) -> dict[str, tuple]:
  """{HF tensor name: canonical path} where a path is ("embed",) or ("blocks", i, "q")."""
  out = {hf: (k,) for k, hf in top_names(cfg).items()}
  for i in range(cfg.n_layers):
    out.update({hf: ("blocks", i, k) for k, hf in block_names(cfg, i).items()})
  return out
