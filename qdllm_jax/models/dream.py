"""Dream configs (Dream-v0-Base-7B / -Instruct-7B, Qwen2 layout) as HF config.json dicts."""
from __future__ import annotations

from qdllm_jax.models.config import ModelConfig, config_from_hf

DREAM_7B = {
    "model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
    "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
    "tie_word_embeddings": False, "use_sliding_window": False, "max_position_embeddings": 131072,
    "mask_token_id": 151666, "pad_token_id": 151643, "eos_token_id": 151643, "bos_token_id": 151665,
    "use_cache": False, "torch_dtype": "bfloat16"}

DREAM_TINY_TEST = dict(DREAM_7B, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128, mask_token_id=120,
                       pad_token_id=121, eos_token_id=121, bos_token_id=122, max_position_embeddings=256)


def dream_hf_config(base: dict = DREAM_7B, **overrides) -> dict:
  return dict(base, **overrides)


def dream_config(base: dict = DREAM_7B, **overrides) -> ModelConfig:
  return config_from_hf(dream_hf_config(base, **overrides))
