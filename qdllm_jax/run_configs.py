"""Building blocks of the config files in configs/: the schema defaults + model settings + method presets.

A config file is Python returning a ConfigDict (`get_config(arg)`), loaded by path by the launch; it imports
this module like any installed package, so it works from any directory and from a plain `pip install .`:

  from qdllm_jax.run_configs import model_config
  def get_config(arg=None):
    return model_config(arg, **{"model_path": "/ckpt/LLaDA-8B-Base", "quant.group_size": 128})

Method presets (`--config configs/<model>.py:<preset>[,<preset>...]`):
  quant_dllm_w2      Quant-dLLM (MCS + DAQ with DOR and RSR + ABMP + compensation), 2 planes/weight (default)
  rtn_w2/w3/w4       round-to-nearest, asymmetric min/max
  gptq_w2/w3/w4      GPTQ, asymmetric min/max, damp 0.01
  no_mcs             ablation: plain unmasked calibration windows (arXiv 2510.03274, Table 2a)
  no_dor             ablation: RSR without the data-aware objective (Table 2c)
  no_abmp            ablation: ABMP ratio 0, uniform order 2 (Table 2b)
  no_comp            ablation: no cross-block error compensation
  block_comp         extension: exact block OBS compensation E = (W1 - W^1) U_bb^-1 instead of the released
                     diagonal form (not in the paper; see docs/results.md)
  order1 / order3    uniform DAQ order 1 / 3 (1 / 3 planes per weight)
  global_2p6         extension: global ABMP under a 2.6 true-bits/weight budget (orders 2 and 3, the most
                     salient blocks model-wide get a third plane); with block_comp it is the best 2-bit MiniLM
                     result in docs/results.md
Ablations combine with a method: `configs/llada8b.py:no_mcs,no_dor`. Baselines keep the MCS calibration of the
model config unless `no_mcs` is added (Quant-dLLM's baselines were calibrated on the same C4 windows).
"""
from __future__ import annotations

from qdllm_jax import config_schema
from qdllm_jax.errors import ConfigError
from qdllm_jax.models.families import get_family


def _method(method, bits):
  def f(c):
    c.quant.method, c.quant.bits = method, bits
  return f


def _set(**kv):
  def f(c):
    for k, v in kv.items():
      sect, name = k.split("__")
      setattr(getattr(c, sect), name, v)
  return f


PRESETS = {
    "quant_dllm_w2": _method("quant_dllm", 2),
    "rtn_w2": _method("rtn", 2), "rtn_w3": _method("rtn", 3), "rtn_w4": _method("rtn", 4),
    "gptq_w2": _method("gptq", 2), "gptq_w3": _method("gptq", 3), "gptq_w4": _method("gptq", 4),
    "no_mcs": _set(calib__mcs=False),
    "no_dor": _set(quant__dor=False),
    "no_abmp": _set(quant__abmp_ratio=0.0),
    "no_comp": _set(quant__compensation=False),
    "block_comp": _set(quant__comp_mode="block"),
    "global_2p6": _set(quant__abmp_scope="global", quant__abmp_ratio=0.0, quant__target_bpw=2.6),
    "order1": _set(quant__method="quant_dllm", quant__bits=1),
    "order3": _set(quant__method="quant_dllm", quant__bits=3),
}
DEFAULT_PRESET = "quant_dllm_w2"

# The Quant-dLLM paper's run settings per family (arXiv 2510.03274, experimental settings and Table 1): C4
# (en/c4-train.00000-of-01024), 128 windows of 4096 tokens, MCS masking (prefix 0.25, seed_x the family's
# `calib_seed`: 0 for LLaDA / 100 for Dream), group 128, ABMP ratio 0.05 (LLaDA) / 0.10 (Dream), on the
# family's preset architecture (`Family.presets`).
PAPER_SETTINGS = {
    "llada": {"model_preset": "llada_8b", "quant.abmp_ratio": 0.05, "eval.protocol": "quant_dllm_llada"},
    "dream": {"model_preset": "dream_7b", "quant.abmp_ratio": 0.10, "eval.protocol": "quant_dllm_dream"},
}


def apply_presets(c, arg=None):
  """Apply the comma-separated presets named in `arg` (None/"" = DEFAULT_PRESET) to ConfigDict `c`; returns c.

  Raises ConfigError naming the unknown preset and listing the known ones.
  """
  names = [n.strip() for n in (arg or DEFAULT_PRESET).split(",") if n.strip()]
  for n in names:
    if n not in PRESETS:
      raise ConfigError(f"unknown method preset {n!r}; expected one of {sorted(PRESETS)} "
                        "(comma-separated, e.g. 'gptq_w3' or 'no_mcs,no_dor')")
    PRESETS[n](c)
  return c


def apply_settings(c, settings: dict):
  """Set {"section.key": value} or {"key": value} on the ConfigDict c (existing keys only); returns c."""
  for k, v in settings.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = getattr(node, p)
    if leaf not in node:
      raise ConfigError(f"{k}: not a key of the schema (every key: python -m qdllm_jax.launch --help_keys)")
    setattr(node, leaf, v)
  return c


def model_config(arg=None, **settings):
  """The schema defaults with `settings` ({"section.key": value}) applied, then the presets in `arg`."""
  return apply_presets(apply_settings(config_schema.defaults(), settings), arg)


def paper_config(family: str, arg=None):
  """The Quant-dLLM paper run config of `family` ("llada" or "dream"), then the presets named in `arg`."""
  return model_config(arg, **{"dtype": "auto", "calib.source": "c4", "calib.nsamples": 128, "calib.seqlen": 4096,
                              "calib.seed_x": get_family(family).calib_seed, "quant.group_size": 128,
                              **PAPER_SETTINGS[family]})
