"""The registry of weight-quantization methods: one `QuantMethod` per method module, one line each below.

Config validation, rules, the `quantize_weight` dispatch, the pipeline's plan check and the planner's byte
counts all read a method from here (`get_method(name)`), so adding a method is one new module
(quant/method_<name>.py building a `QuantMethod`, see quant/method_spec.py) plus one line in `_ALL`.
"""
from __future__ import annotations

from qdllm_jax.errors import QuantizationError
from qdllm_jax.quant import method_gptq, method_quant_dllm, method_rtn
from qdllm_jax.quant.method_spec import SCALE_DTYPES, QuantMethod

_ALL = (
    method_quant_dllm.METHOD,
    method_gptq.METHOD,
    method_rtn.METHOD,
)
REGISTRY: dict[str, QuantMethod] = {m.name: m for m in _ALL}
METHODS = tuple(REGISTRY)  # the names, the paper's method first


def get_method(name: str) -> QuantMethod:
  """The registered method `name`; QuantizationError naming the registered ones otherwise."""
  m = REGISTRY.get(name) if isinstance(name, str) else None
  if m is None:
    raise QuantizationError(f"method={name!r} is unknown; expected one of {tuple(REGISTRY)}.")
  return m


__all__ = ["METHODS", "REGISTRY", "SCALE_DTYPES", "QuantMethod", "get_method"]
