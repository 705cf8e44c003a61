"""Dream-v0-Base-7B (Dream-org/Dream-v0-Base-7B). Paper settings: qdllm_jax/run_configs.py."""
from qdllm_jax.run_configs import paper_config


def get_config(arg=None):
  return paper_config("dream", arg)
