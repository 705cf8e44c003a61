"""The Dream family (Dream-v0-Base-7B / -Instruct-7B, Qwen2 layout): config.json parsing and tensor names on the
shared pre-norm decoder of models/transformer.py (q/k/v biases, GQA, logits shifted by one)."""
from __future__ import annotations

from typing import Any, Mapping

from qdllm_jax.errors import CheckpointError
from qdllm_jax.models.llada import decoder_family
from qdllm_jax.models.model_config import ModelConfig, freeze, get_field

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


BLOCK_NAMES = {"attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight",
               "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
               "ff_norm": "post_attention_layernorm.weight", "gate": "mlp.gate_proj.weight",
               "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight", "q_bias": "self_attn.q_proj.bias",
               "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias"}
TOP_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "head": "lm_head.weight"}
BLOCK_PREFIX = "model.layers.{}."


def _dream_config(d: Mapping[str, Any], path: str) -> ModelConfig:
  if d.get("use_sliding_window", False):
    raise CheckpointError(f"{path}: use_sliding_window=true is not supported (Dream uses full attention)")
  if d.get("rope_scaling"):
    raise CheckpointError(f"{path}: rope_scaling={d['rope_scaling']!r} is not supported; expected null")
  if d.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{path}: hidden_act={d['hidden_act']!r}; expected 'silu'")
  hidden = int(get_field(d, "hidden_size", path))
  n_heads = int(get_field(d, "num_attention_heads", path))
  return ModelConfig(
      arch="dream", vocab_size=int(get_field(d, "vocab_size", path)), hf_vocab_size=int(d["vocab_size"]),
      d_model=hidden, n_layers=int(get_field(d, "num_hidden_layers", path)), n_heads=n_heads,
      n_kv_heads=int(d.get("num_key_value_heads") or n_heads), head_dim=int(d.get("head_dim") or hidden // n_heads),
      mlp_hidden=int(get_field(d, "intermediate_size", path)), rope_theta=float(d.get("rope_theta", 10000.0)),
      norm_eps=float(d.get("rms_norm_eps", 1e-6)), qkv_bias=True,
      tie_embeddings=bool(d.get("tie_word_embeddings", False)), rope_full_precision=False,
      mask_id=d.get("mask_token_id", 151666), bos_id=d.get("bos_token_id"), eos_id=d.get("eos_token_id"),
      pad_id=d.get("pad_token_id"), max_seq_len=int(d.get("max_position_embeddings", 2048)), shift_logits=True,
      positions_skip_padding=True, raw=freeze(dict(d)))


def dream_hf_config(base: dict = DREAM_7B, **overrides) -> dict:
  return dict(base, **overrides)


def dream_config(base: dict = DREAM_7B, **overrides) -> ModelConfig:
  return _dream_config(dream_hf_config(base, **overrides), "config.json")


# seed_x 100: the released Dream calibration script's default
FAMILY = decoder_family("dream", ("Dream", "dream"), _dream_config, TOP_NAMES, BLOCK_NAMES, BLOCK_PREFIX,
                        calib_seed=100, presets={"dream_7b": dream_config(DREAM_7B)}, sampler="dream",
                        description="Dream-v0-Base/Instruct-7B")
