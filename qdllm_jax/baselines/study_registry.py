"""The registry of the PTQ study's methods (study.py): one `StudyMethod` (baselines/study_method.py) per line.

The study parses entries, validates the config, builds each entry's model and fingerprints its cached row from
these objects only, so a new study method is its module's `StudyMethod` plus one line in `_ALL`.
"""
from __future__ import annotations

from qdllm_jax.baselines import awq, duquant, quarot, smoothquant, weight_only
from qdllm_jax.baselines.study_method import StudyMethod
from qdllm_jax.errors import ConfigError

_ALL = (
    weight_only.RTN,
    weight_only.GPTQ,
    awq.STUDY_METHOD,
    smoothquant.STUDY_METHOD,
    quarot.STUDY_METHOD,
    duquant.STUDY_METHOD,
)
REGISTRY: dict[str, StudyMethod] = {m.name: m for m in _ALL}


def get_study_method(name: str) -> StudyMethod:
  """The registered study method `name`; ConfigError naming the registered ones otherwise."""
  m = REGISTRY.get(name)
  if m is None:
    raise ConfigError(f"study method {name!r} is unknown; expected one of {sorted(REGISTRY)}.")
  return m


__all__ = ["REGISTRY", "StudyMethod", "get_study_method"]
