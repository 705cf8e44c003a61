"""The model-family registry: `ModelConfig.arch` / config.json `model_type` -> its `Family` (models/family.py).

A new family is one module that builds a `Family` (config parser, tensor names, shapes, linear groups, embed,
block, head) plus one line in `FAMILIES` below. Everything else (loader, hf names, calibration capture,
quantization pipeline, rules, baselines) asks `get_family(cfg.arch)`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax

from qdllm_jax.errors import CheckpointError, ConfigError
from qdllm_jax.models import bert, dream, llada
from qdllm_jax.models.family import Family
from qdllm_jax.models.model_config import ModelConfig

FAMILIES: dict[str, Family] = {f.name: f for f in (llada.FAMILY, dream.FAMILY, bert.FAMILY)}
_BY_MODEL_TYPE = {mt: f for f in FAMILIES.values() for mt in f.model_types}
# {preset name: ModelConfig} over every family (`Family.presets`); a name is declared once
PRESETS: dict[str, ModelConfig] = {n: c for f in FAMILIES.values() for n, c in f.presets.items()}
assert len(PRESETS) == sum(len(f.presets) for f in FAMILIES.values()), "a preset name is declared twice"


def get_family(arch: str) -> Family:
  """The family named `arch` ("llada", "dream", "bert"); CheckpointError for an unknown name."""
  fam = FAMILIES.get(arch)
  if fam is None:
    raise CheckpointError(f"unknown arch {arch!r}; expected one of {tuple(FAMILIES)}")
  return fam


def preset(name: str) -> ModelConfig:
  """The ModelConfig of the preset `name` (`config.model_preset`); ConfigError naming the known presets."""
  if name not in PRESETS:
    raise ConfigError(f"config.model_preset={name!r}: expected one of {tuple(PRESETS)} (models/families.py: "
                      "each family's presets), or '' with a model_path")
  return PRESETS[name]


def family_of(cfg: ModelConfig) -> Family:
  """The family of a ModelConfig."""
  return get_family(cfg.arch)


def family_for_model_type(model_type, path: str = "config.json") -> Family:
  """The family loading config.json `model_type`; CheckpointError naming the known ones otherwise."""
  fam = _BY_MODEL_TYPE.get(model_type)
  if fam is None:
    known = "; ".join(f"{'/'.join(map(repr, f.model_types))}: {f.description}" for f in FAMILIES.values())
    raise CheckpointError(f"{path}: unknown model_type {model_type!r}; expected one of {known} (models/families.py)")
  return fam


def config_from_hf(d: Mapping[str, Any], path: str = "config.json") -> ModelConfig:
  """Parse a Hugging Face `config.json` dict with the family its `model_type` names."""
  return family_for_model_type(d.get("model_type"), path).parse_config(d, path)


def param_shapes(cfg: ModelConfig) -> dict:
  """The params pytree's shapes of `cfg`'s family (nested dicts of tuples)."""
  return family_of(cfg).param_shapes(cfg)


def forward(params: dict, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            act=None) -> jax.Array:
  """The family's full forward: int32 [B, T] -> float32 [B, T, V] logits (or [B, T, D] hidden states for
  an encoder without an output head; see models/bert.py)."""
  return family_of(cfg).forward(params, cfg, input_ids, attention_mask, act=act)


forward_jit = jax.jit(forward, static_argnames=("cfg", "act"))


def num_params(cfg: ModelConfig) -> int:
  """Parameter count of `cfg`'s family from its shapes alone (no allocation)."""
  leaves = jax.tree_util.tree_leaves(param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
  return int(sum(math.prod(s) for s in leaves))
