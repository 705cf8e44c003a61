"""Masked-diffusion samplers: LLaDA (semi-autoregressive, low-confidence remasking) and Dream.

    from qdllm_jax.sampling import llada_generate, dream_generate
"""
from qdllm_jax.sampling.dream_sampler import dream_generate, dream_step_noise, dream_transfer_factors
from qdllm_jax.sampling.llada_sampler import gumbel_precision_check, llada_generate, llada_step_noise
from qdllm_jax.sampling.sampler_common import shift_logits, topk_row_mask
