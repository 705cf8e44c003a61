"""LLaDA configs (LLaDA-8B-Base/Instruct, LLaDA-1.5 share one architecture) as HF config.json dicts.

`llada_hf_config(**overrides)` returns the dict the real checkpoint ships (GSAI-ML/LLaDA-8B-Base config.json);
`llada_config(**overrides)` parses it into a `ModelConfig`.
"""
from __future__ import annotations

from qdllm_jax.models.config import ModelConfig, config_from_hf

LLADA_8B = {
    "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 4096, "n_heads": 32,
    "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288, "mlp_ratio": 4, "vocab_size": 126464,
    "embedding_size": 126464, "rope": True, "rope_theta": 500000.0, "rope_full_precision": True,
    "rms_norm_eps": 1e-5, "layer_norm_type": "rms", "include_bias": False, "include_qkv_bias": False,
    "weight_tying": False, "block_type": "llama", "activation_type": "silu", "alibi": False,
    "attention_layer_norm": False, "scale_logits": False, "input_emb_norm": False,
    "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081,
    "bos_token_id": 126080, "use_cache": False, "torch_dtype": "bfloat16"}

LLADA_TINY_TEST = dict(LLADA_8B, d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=64,
                       vocab_size=128, embedding_size=128, rope_theta=5e5, mask_token_id=120,
                       eos_token_id=121, pad_token_id=121, bos_token_id=122, max_sequence_length=256)


def llada_hf_config(base: dict = LLADA_8B, **overrides) -> dict:
  return dict(base, **overrides)


def llada_config(base: dict = LLADA_8B, **overrides) -> ModelConfig:
  return config_from_hf(llada_hf_config(base, **overrides))
