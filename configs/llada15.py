"""LLaDA-1.5 (GSAI-ML/LLaDA-1.5, VRPO-aligned Instruct). Paper settings: qdllm_jax/run_configs.py."""
from qdllm_jax.run_configs import paper_config


def get_config(arg=None):
  return paper_config("llada", arg)
