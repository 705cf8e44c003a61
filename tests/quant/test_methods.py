"""The method registry: every registered method's declared byte count equals its packed weight's arrays
(counted from the arrays themselves), the shape checks refuse what the solvers cannot do, and a method added
by one registration is usable through quantize_weight, rules and the config check with no other change."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax import plan_timing
from qdllm_jax.errors import ConfigError, QuantizationError
from qdllm_jax.quant import api, hessian, method_rtn, methods, packed, rules


def _wh(rows=16, cols=256, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(rows, cols)).astype(np.float32)
  x = rng.normal(size=(4 * cols, cols)).astype(np.float32)
  return w, 2 * x.T @ x / len(x)


@pytest.mark.parametrize("name", methods.METHODS)
def test_declared_bytes_equal_the_stored_arrays(name, bits=3, group=64):
  w, h = _wh()
  opts = dict(rsr_iters=1) if name == "quant_dllm" else {}
  qw = api.quantize_weight(w, h, method=name, bits=bits, group_size=group, abmp_ratio=0.0, **opts)
  stored = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for a in (getattr(qw, k, None) for k in ("planes", "a_r", "a_c", "orders", "plane_block", "qweight",
                                                  "scales", "zeros", "g_idx")) if a is not None)
  m = methods.get_method(name)
  assert m.packed_bytes(16, 256, bits, group, m.resolve_options({})) == stored


def test_byte_layout_closed_forms():
  # 3-bit codes: 32 codes in 3 words, so 256 columns = 8 units = 24 words per row; g64 -> 4 groups
  assert packed.uniform_nbytes(16, 256, 3, 64, "float16") == 16 * 24 * 4 + 16 * 4 * 2 + 16 * 4
  assert packed.uniform_nbytes(16, 256, 3, 64, "float32", sym=True, act_order=True) == \
      16 * 24 * 4 + 16 * 4 * 4 + 4 * 256
  # 4 planes of 128-column blocks: 4 x 16 x 4 words + 4 x (16 + 128) halfs + 2 orders + 4 plane indices
  assert packed.binary_planes_nbytes(16, 256, 4, 128) == 4 * 16 * 4 * 4 + 4 * (16 + 128) * 2 + 2 + 4 * 4


@pytest.mark.parametrize("name,bits,group,n_in,field", [
    ("quant_dllm", 4, 128, 256, "bits"), ("quant_dllm", 2, 48, 96, "group_size"),
    ("quant_dllm", 2, 64, 96, "group_size"), ("gptq", 1, 128, 256, "bits"), ("gptq", 2, 96, 384, "group_size"),
    ("rtn", 9, 128, 256, "bits"), ("rtn", 2, 100, 256, "group_size")])
def test_shape_checks_name_the_field(name, bits, group, n_in, field):
  assert methods.get_method(name).check_shape(bits, group, n_in)[0] == field


@pytest.mark.parametrize("name", methods.METHODS)
def test_solve_kernel_is_the_solver_the_api_runs(name, bits=2, group=64):
  """What the planner times (`solve_kernel` on the prepared factor) reconstructs the weight the API returns."""
  w, h = _wh(seed=1)
  m = methods.get_method(name)
  ph = None if m.hessian_factor is None else hessian.prepare_hessian(jnp.asarray(w), jnp.asarray(h),
                                                                     factor=m.hessian_factor)
  opts = dict(rsr_iters=1) if name == "quant_dllm" else {}
  out = m.solve_kernel(jnp.asarray(w), ph, bits, group, m.resolve_options(opts))()
  w_hat = out[3] if isinstance(out, tuple) else out["w_hat"]  # rtn_quantize's tuple, the solvers' dicts
  qw = api.quantize_weight(w, h, method=name, bits=bits, group_size=group, abmp_ratio=0.0, **opts)
  np.testing.assert_allclose(np.asarray(w_hat), np.asarray(qw.dequantize()), rtol=1e-6, atol=1e-6)


def test_orders_checked_against_the_column_blocks():
  w, h = _wh()
  with pytest.raises(QuantizationError, match=r"orders must be 4 integers in 1..3 .*shape \(3,\)"):
    api.quantize_weight(w, h, method="quant_dllm", bits=2, group_size=64, orders=[2, 2, 2])
  with pytest.raises(QuantizationError, match="range 1..4"):
    api.quantize_weight(w, h, method="quant_dllm", bits=2, group_size=64, orders=[1, 2, 4, 2])
  with pytest.raises(QuantizationError, match="one such row per matrix"):
    api.quantize_weights_shared([w, w], h, method="quant_dllm", bits=2, group_size=64, orders=[[2] * 4] * 3)


def test_every_method_accepts_its_own_defaults():
  for m in methods.REGISTRY.values():
    assert m.check_options(m.resolve_options({})) is None
    assert set(m.config_keys) >= {"scale_dtype"}


def test_one_registration_makes_a_method_usable(monkeypatch):
  # a new method: RTN's solver under another name, symmetric by default
  new = dataclasses.replace(method_rtn.METHOD, name="rtn_sym", options={**method_rtn.METHOD.options, "sym": True})
  monkeypatch.setitem(methods.REGISTRY, "rtn_sym", new)
  w, _ = _wh()
  got = api.quantize_weight(w, None, method="rtn_sym", bits=3, group_size=64)
  ref = api.quantize_weight(w, None, method="rtn", bits=3, group_size=64, sym=True)
  np.testing.assert_array_equal(np.asarray(got.dequantize()), np.asarray(ref.dequantize()))
  assert rules.Rule("rtn_sym", 3, 64).method == "rtn_sym"
  # the planner times the new method's own kernel, with its own defaults (symmetric)
  timed = plan_timing.solver_fn("rtn_sym", 3, 64, {}, 16, 256)()[3]
  w_rand = 0.02 * np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)  # solver_fn's layer
  ref_rand = api.quantize_weight(w_rand, None, method="rtn", bits=3, group_size=64, sym=True)
  np.testing.assert_array_equal(np.asarray(timed), np.asarray(ref_rand.dequantize()))
  monkeypatch.delitem(methods.REGISTRY, "rtn_sym")
  with pytest.raises(QuantizationError, match="rtn_sym"):
    api.quantize_weight(w, None, method="rtn_sym", bits=3, group_size=64)
  with pytest.raises(ConfigError, match="unknown"):
    rules.Rule("rtn_sym", 3, 64)
