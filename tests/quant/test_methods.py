"""The method registry: every registered method's declared byte count equals its packed weight's arrays
(counted from the arrays themselves), the shape checks refuse what the solvers cannot do, and a method added
by one registration is usable through quantize_weight, rules and the config check with no other change."""
import dataclasses

import numpy as np
import pytest

from qdllm_jax.errors import ConfigError, QuantizationError
from qdllm_jax.quant import api, method_rtn, methods, packed, rules


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
  monkeypatch.delitem(methods.REGISTRY, "rtn_sym")
  with pytest.raises(QuantizationError, match="rtn_sym"):
    api.quantize_weight(w, None, method="rtn_sym", bits=3, group_size=64)
  with pytest.raises(ConfigError, match="unknown"):
    rules.Rule("rtn_sym", 3, 64)
