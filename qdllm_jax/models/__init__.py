"""LLaDA, Dream and BERT in JAX. Public contract:

    from qdllm_jax.models import load_pretrained
    model = load_pretrained(path)            # a local HF directory (config.json + safetensors)
    out = model(input_ids, attention_mask)   # int32 [B, T] -> float32 [B, T, vocab] logits, or, for an
                                             # encoder without an LM head (BERT/MiniLM), [B, T, d_model]
                                             # last hidden states (`model.config.has_head` says which)

The family of a checkpoint comes from config.json `model_type` (models/families.py, one module per family).
"""
from qdllm_jax.models.dream import DREAM_7B, dream_config
from qdllm_jax.models.families import (
                                      FAMILIES,
                                      PRESETS,
                                      config_from_hf,
                                      family_for_model_type,
                                      family_of,
                                      forward,
                                      get_family,
                                      num_params,
)
from qdllm_jax.models.hf_checkpoint import (
                                           CheckpointReader,
                                           load_pretrained,
                                           load_top,
                                           open_checkpoint,
                                           save_pretrained,
                                           stream_blocks,
)
from qdllm_jax.models.hf_tokenizer import load_tokenizer
from qdllm_jax.models.llada import LLADA_8B, llada_config
from qdllm_jax.models.model import Model
from qdllm_jax.models.model_config import ModelConfig, config_to_hf
