"""`QuantMethod`: what one weight-quantization method declares, so that the rest of the package reads it
instead of spelling the method's name (the registry is quant/methods.py).

A method is one module (quant/method_<name>.py) that builds one `QuantMethod` over the pure solvers, plus one
line in quant/methods.py. Everything that differs between methods lives in that object:
  name, summary            the config/rule spelling and a one-line description
  needs_hessian            whether `quantize_weight` needs H (RTN does not)
  options                  {option: default} of the solver options it accepts (the typed option set)
  config_keys              the run config's `quant.*` keys it reads (the rest are ignored for it)
  check_shape              (bits, group_size, in_features or None) -> None, or (field, what is expected)
  check_options            resolved options -> None, or a message naming the bad option and its range
  check_option_shapes      (resolved options, group_size, in_features, number of matrices) -> None, or a message:
                           the options whose shape depends on the matrices (quant_dllm's explicit `orders`)
  packed_bytes             (rows, cols, bits, group_size, options) -> exact bytes of the packed weight
  solve                    (ws, h, bits, group_size, abmp_ratio, options) -> [(QuantizedWeight, w_hat, info)]
  solve_kernel             (w, ph, bits, group_size, options) -> a zero-argument callable running the solver's
                           kernel once on a prepared float32 [out, in] w (ph: `prepare_hessian(w, H,
                           factor=hessian_factor)`, None without a factor): what the planner times (plan_timing.py)
  abmp_bits                the bits at which ABMP mixes orders 1/2/3 per column block (None: no ABMP)
  hessian_factor           the factor of H its solver reads ("cholesky", "inverse" or None), for the planner
  reports_layer_loss       its solve reports info["layer_loss"] = tr(E H E^T) itself, so the per-matrix
                           diagnostics need only tr(W H W^T) (`hessian.output_energy`; else `hessian.layer_errors`)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

# Options every method accepts (storage of the scales).
SCALE_DTYPES = ("float16", "bfloat16", "float32")
COMMON_OPTIONS = {"scale_dtype": "float16"}


@dataclasses.dataclass(frozen=True)
class QuantMethod:
  """One weight-quantization method (see the module docstring for the fields)."""
  name: str
  summary: str
  needs_hessian: bool
  options: Mapping[str, Any]
  config_keys: tuple[str, ...]
  check_shape: Callable[[Any, Any, int | None], tuple[str, str] | None]
  check_options: Callable[[dict], str | None]
  packed_bytes: Callable[[int, int, int, int, dict], int]
  solve: Callable
  solve_kernel: Callable
  check_option_shapes: Callable[[dict, int, int, int], str | None] = lambda opt, group_size, n_in, n_matrices: None
  abmp_bits: int | None = None
  hessian_factor: str | None = None
  reports_layer_loss: bool = False

  def resolve_options(self, given: Mapping[str, Any]) -> dict:
    """The full option dict: `given` over the defaults (unknown names are the caller's check)."""
    return {k: given.get(k, v) for k, v in self.options.items()}

  def unknown_options(self, given) -> list[str]:
    """Names in `given` that this method does not accept, sorted."""
    return sorted(set(given) - set(self.options))


def is_int(v) -> bool:
  """True for Python / NumPy integers, False for bool."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_damping(opt: dict) -> str | None:
  """The damping range shared by the Hessian-based methods."""
  if not 0 < opt["percdamp"] <= opt["max_percdamp"]:
    return f"percdamp={opt['percdamp']} must lie in (0, max_percdamp={opt['max_percdamp']}]."
  return None
