"""Public API: input validation before heavy work, method dispatch, diagnostics, shared-Hessian batching."""
import numpy as np
import pytest
import quant_ref as ref

from qdllm_jax.errors import QuantizationError
from qdllm_jax.quant import quantize_weight, quantize_weights_shared
from qdllm_jax.quant.packed import LAYOUT_VERSION

W, H = ref.random_layer(16, 512, seed=11)


@pytest.mark.parametrize("kwargs,match", [
    (dict(w=np.where(np.eye(16, 512) > 0, np.nan, W)), "non-finite"),
    (dict(w=W[0]), "2-D"),
    (dict(w=W.astype(np.int32)), "floating point"),
    (dict(hessian=H[:256, :256]), "expected \\[in, in\\]"),
    (dict(hessian=np.where(np.eye(512) > 0, np.inf, H)), "non-finite"),
    (dict(hessian=None), "needs the layer Hessian"),
    (dict(bits=5), "bits=5 is not supported by quant_dllm"),
    (dict(group_size=96), "multiple of 32 dividing"),
    (dict(method="gptq", group_size=100), "does not divide"),
    (dict(method="gptq", group_size=96, w=W[:, :384], hessian=H[:384, :384]), "divide 128"),
    (dict(method="gptq", bits=1), "2..8"),
    (dict(method="rtn", bits=9), "2..8"),
    (dict(method="awq"), "unknown"),
    (dict(foo=1), "unknown option"),
    (dict(method="rtn", act_order=True), "unknown option"),
    (dict(orders=[1, 2, 3]), "orders must be 4"),
    (dict(orders=[1, 2, 3, 4]), "1..3"),
    (dict(z_diag="diag"), "z_diag"),
    (dict(abmp_ratio=2.0), "abmp_ratio"),
    (dict(scale_dtype="int8"), "scale_dtype"),
    (dict(w=W * 1e7), "float16 scales"),
])
def test_bad_input_refused(kwargs, match):
  args = dict(w=W, hessian=H)
  args.update(kwargs)
  with pytest.raises(QuantizationError, match=match):
    quantize_weight(args.pop("w"), args.pop("hessian"), **args)


def test_rtn_ignores_hessian_and_info():
  qw, info = quantize_weight(W, None, method="rtn", bits=4, group_size=64, return_info=True)
  assert qw.method == "rtn" and qw.format == "uniform" and qw.layout_version == LAYOUT_VERSION
  assert "layer_loss" not in info
  np.testing.assert_array_equal(np.asarray(qw.dequantize()), np.asarray(info["w_hat"]))
  _, _, _, wh = ref.rtn(W.astype(np.float64), 4, 64, False, scale_dtype=np.float16)
  np.testing.assert_allclose(np.asarray(qw.dequantize()), wh, atol=1e-6)


def test_quant_dllm_end_to_end():
  qw, info = quantize_weight(W, H, return_info=True)
  assert qw.format == "binary_planes" and qw.num_planes == 8
  np.testing.assert_array_equal(np.asarray(qw.orders), info["orders"])
  assert np.sum(info["orders"]) == 8  # nb = 4 blocks, ratio 0.05 -> r = 0: all order 2
  dq = qw.dequantize()
  assert np.array_equal(np.asarray(dq), np.asarray(info["w_hat"]))
  d = W.astype(np.float64) - np.asarray(dq, np.float64)
  np.testing.assert_allclose(info["layer_loss"], np.trace(d @ H.astype(np.float64) @ d.T), rtol=1e-3)
  assert 0 < info["relative_sq_output_error"] < 0.2 and info["percdamp"] == 0.01
  hand = 8 * 16 * 128 / 8 + 8 * (16 + 128) * 2 + 4 + 8 * 4  # planes, a_r + a_c fp16, orders, plane_block
  assert qw.nbytes == hand
  # explicit orders and order-1 planes
  qw1, info1 = quantize_weight(W, H, bits=1, return_info=True)
  assert qw1.num_planes == 4 and info1["layer_loss"] > info["layer_loss"]


def test_shared_hessian_equals_individual():
  w2 = 1.5 * W[::-1].copy()
  w3 = W[:8]
  res = quantize_weights_shared([W, w2, w3], H, method="gptq", bits=3, group_size=128)
  for w, qs in zip([W, w2, w3], res):
    qi = quantize_weight(w, H, method="gptq", bits=3, group_size=128)
    np.testing.assert_array_equal(np.asarray(qs.qweight), np.asarray(qi.qweight))
    np.testing.assert_array_equal(np.asarray(qs.dequantize()), np.asarray(qi.dequantize()))
  orders = [[1, 2, 3, 2], [2, 2, 1, 3]]  # one row per matrix (e.g. from global ABMP)
  res = quantize_weights_shared([W, w2], H, method="quant_dllm", orders=orders)
  for w, o, qs in zip([W, w2], orders, res):
    qi = quantize_weight(w, H, method="quant_dllm", orders=o)
    np.testing.assert_array_equal(np.asarray(qs.orders), o)
    np.testing.assert_array_equal(np.asarray(qs.dequantize()), np.asarray(qi.dequantize()))
  with pytest.raises(QuantizationError, match="one such row per matrix"):
    quantize_weights_shared([W, w2], H, orders=[[1, 2, 3, 2]] * 3)
  with pytest.raises(QuantizationError, match="same in_features"):
    quantize_weights_shared([W, W[:, :256]], H, method="gptq")
