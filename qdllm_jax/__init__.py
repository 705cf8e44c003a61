"""qdllm-jax: post-training extreme low-bit quantization of diffusion LLMs in JAX.

Data path (one sub-package per step):
  config -> models (load) -> data/calib (MCS) -> quant (GPTQ, DAQ, ABMP; pack) -> checkpoint -> eval
"""
__version__ = "0.1.0"
