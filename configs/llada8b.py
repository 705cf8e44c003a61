"""LLaDA-8B-Base (GSAI-ML/LLaDA-8B-Base): Quant-dLLM Table 1 settings.

  python -m qdllm_jax.launch --config configs/llada8b.py --config.model_path=/path/to/checkpoint --workdir runs/llada8b
  python -m qdllm_jax.launch --config configs/llada8b.py:gptq_w2 ...            (a method preset: configs/presets.py)
  python -m qdllm_jax.launch --config configs/llada8b.py --dry_run --config.plan.hardware=tpu_v5e_8

Calibration: C4 (`en/c4-train.00000-of-01024`), 128 windows of 4096 tokens, MCS masking (prefix 0.25, seed_x
0); group 128, ABMP ratio 0.05; evaluation protocol quant_dllm_llada (quant-dllm.md §0, §5, §7, §8). The C4
shard must be available offline: in the HF datasets cache (source "c4") or as a local file
(`--config.calib.source=/data/c4-train.00000-of-01024.json.gz`).
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from configs._common import model_config  # noqa: E402


def get_config(arg=None):
  """The llada8b run config; `arg` names method presets (default quant_dllm_w2)."""
  return model_config(arg, **{
      "model_preset": "llada_8b", "dtype": "auto",
      "calib.source": "c4", "calib.nsamples": 128, "calib.seqlen": 4096, "calib.seed_x": 0,
      "quant.group_size": 128, "quant.abmp_ratio": 0.05,
      "eval.protocol": "quant_dllm_llada"})
