"""The shipped tiny LLaDA (package data, qdllm_jax/shipped/tiny-llada): the end-to-end main job on any laptop,
<= 3 minutes on 2 cores.

  python -m qdllm_jax.launch --config configs/tiny.py --workdir runs/tiny
  python -m qdllm_jax.launch --config configs/tiny.py:gptq_w3 --workdir runs/tiny-gptq3

The tiny model (d_model 256, 4 blocks, SwiGLU 1024, vocab 2048) is too narrow for the paper's 128-column
blocks to leave ABMP anything to move (2 blocks per 256-wide matrix, and floor(2 * 0.05) = 0), so this config
uses 64-column blocks and ABMP ratio 0.25: 1 of 4 blocks at order 1 and 1 at order 3 in the 256-wide
matrices, 4 / 8 / 4 of 16 in `ff_out`. Calibration: 32 MCS-masked windows of 128 tokens of the shipped
KJV training chapters; evaluation: the `tiny` protocol (held-out ELBO perplexity, 3 MC and 2 generation
families), FP and quantized.
"""
from qdllm_jax.data.shipped import TINY_MODEL_DIR
from qdllm_jax.run_configs import model_config


def get_config(arg=None):
  """The tiny run config; `arg` names method presets (default quant_dllm_w2)."""
  return model_config(arg, **{
      "model_path": TINY_MODEL_DIR, "model_preset": "tiny_llada",
      "dtype": "auto",
      "calib.source": "corpus", "calib.nsamples": 32, "calib.seqlen": 128, "calib.seed_x": 0,
      "calib.chunk_size": 8,
      "quant.group_size": 64, "quant.abmp_ratio": 0.25,
      "eval.protocol": "tiny"})
