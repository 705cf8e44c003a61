"""LLaDA-8B-Base (GSAI-ML/LLaDA-8B-Base): the Quant-dLLM Table 1 run. Paper settings: qdllm_jax/run_configs.py."""
from qdllm_jax.run_configs import paper_config


def get_config(arg=None):
  return paper_config("llada", arg)
