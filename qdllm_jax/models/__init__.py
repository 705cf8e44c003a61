"""LLaDA and Dream in JAX. Public contract:

    from qdllm_jax.models import load_pretrained
    model = load_pretrained(path)            # a local HF directory (config.json + safetensors)
    logits = model(input_ids)                # int32 [B, T] -> float32 [B, T, vocab]
"""
from qdllm_jax.models.config import ModelConfig, config_from_hf, config_to_hf
from qdllm_jax.models.dream import DREAM_7B, dream_config
from qdllm_jax.models.llada import LLADA_8B, llada_config
from qdllm_jax.models.model import Model
from qdllm_jax.models.transformer import block_forward, forward, init_params, num_params
from qdllm_jax.models.checkpoint_io import (CheckpointReader, load_pretrained, load_tokenizer, load_top,
                                           open_checkpoint, save_pretrained, stream_blocks)
