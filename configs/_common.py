"""Shared assembly of the model configs: base schema + model settings + method presets.

The real-model configs (llada8b*, llada15, dream7b*) all run the Quant-dLLM paper settings of their family
(`paper_config`): C4 (`en/c4-train.00000-of-01024`), 128 windows of 4096 tokens, MCS masking (prefix 0.25,
seed_x 0 for LLaDA / 100 for Dream), group 128, ABMP ratio 0.05 (LLaDA) / 0.10 (Dream), evaluation protocol
quant_dllm_llada / quant_dllm_dream (Quant-dLLM, arXiv 2510.03274, experimental settings and Table 1).
The C4 shard must be available
offline: in the HF datasets cache (source "c4") or as a local file (`--config.calib.source=/data/c4.json.gz`).
Usage, for any of them:

  python -m qdllm_jax.launch --config configs/llada8b.py --config.model_path=CKPT_DIR --workdir runs/llada8b
  python -m qdllm_jax.launch --config configs/llada8b.py:gptq_w2 ...     (method presets: configs/presets.py)
  python -m qdllm_jax.launch --config configs/llada8b.py --dry_run --config.plan.hardware=tpu_v5e_8

Config files are loaded by path (`--config configs/llada8b.py[:preset]`); each inserts the repository root on
sys.path so that `configs.base` and `configs.presets` import from any working directory.
"""
import os

from configs import base, presets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def apply_settings(c, settings: dict):
  """Set {"section.key": value} or {"key": value} on the ConfigDict c (existing keys only); returns c."""
  for k, v in settings.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = getattr(node, p)
    if leaf not in node:
      raise KeyError(f"{k}: not a key of the schema")
    setattr(node, leaf, v)
  return c


def model_config(arg, **settings):
  """get_base() with `settings` ({"section.key": value} or {"key": value}) applied, then the presets in `arg`."""
  return presets.apply(apply_settings(base.get_base(), settings), arg)


def study_config(**settings):
  """The PTQ-study schema (qdllm_jax.study.defaults: the paper's methods, bit widths and settings) with `settings`."""
  from qdllm_jax import study
  return apply_settings(study.defaults(), settings)


PAPER_SETTINGS = {
    "llada": {"model_preset": "llada_8b", "calib.seed_x": 0, "quant.abmp_ratio": 0.05,
              "eval.protocol": "quant_dllm_llada"},
    "dream": {"model_preset": "dream_7b", "calib.seed_x": 100, "quant.abmp_ratio": 0.10,
              "eval.protocol": "quant_dllm_dream"},
}


def paper_config(family, arg=None):
  """The Quant-dLLM paper run config of `family` ("llada" or "dream"), then the presets named in `arg`."""
  return model_config(arg, **{"dtype": "auto", "calib.source": "c4", "calib.nsamples": 128, "calib.seqlen": 4096,
                              "quant.group_size": 128, **PAPER_SETTINGS[family]})
