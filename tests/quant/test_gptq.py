"""GPTQ against a direct column-by-column NumPy transcription of the original algorithm."""
import jax.numpy as jnp
import numpy as np
import pytest
import quant_ref as ref

from qdllm_jax.quant.api import quantize_weight
from qdllm_jax.quant.gptq import gptq_quantize
from qdllm_jax.quant.hessian import prepare_hessian

CASES = [(2, 64, False), (3, 128, True), (4, 256, False), (2, -1, True)]
SLOW_CASES = [(b, g, s) for b in (2, 3, 4) for g in (32, 64, 128, 256, -1) for s in (False, True)]


def _check_float64(bits, g, sym, seed=0, out=16, n=512):
  w, h = ref.random_layer(out, n, seed=seed, tokens=n + 512)
  u = ref.inverse_upper(h)
  with ref.x64():
    r = gptq_quantize(jnp.asarray(w, jnp.float64), jnp.asarray(u), bits=bits, group_size=g, sym=sym,
                      scale_dtype=None)
    mine = np.asarray(r["codes"])
    codes, sc, zr, w_hat, loss, bad = ref.gptq(w, u, bits, g, sym, follow=mine)
    assert bad == 0  # identical codes except at exact rounding ties (x / scale = k + 1/2)
    assert np.array_equal(mine, codes)
    np.testing.assert_allclose(np.asarray(r["scales"]), sc, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(r["zeros"]), zr)
    np.testing.assert_allclose(np.asarray(r["w_hat"]), w_hat, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(float(r["loss"]), loss, rtol=1e-10)


@pytest.mark.parametrize("bits,g,sym", CASES)
def test_gptq_matches_reference_float64(bits, g, sym):
  _check_float64(bits, g, sym)


def test_gptq_group_spanning_superblocks():
  """g = 1024 > the 512-column super-block: group parameters come from W as updated by all earlier blocks."""
  _check_float64(3, 1024, False, out=8, n=2048)


@pytest.mark.slow
@pytest.mark.parametrize("bits,g,sym", SLOW_CASES)
def test_gptq_matches_reference_grid(bits, g, sym):
  _check_float64(bits, g, sym, seed=1)


def test_gptq_float32_identical_codes():
  """float32 solver vs float64 reference on an asymmetric grid (no systematic rounding ties): identical codes."""
  w, h = ref.random_layer(16, 256, seed=3)
  ph = prepare_hessian(w, h)
  u = np.asarray(ph.u, np.float64)
  r = gptq_quantize(ph.w, ph.u, bits=3, group_size=64, sym=False, scale_dtype=None)
  codes, sc, zr, w_hat, loss, bad = ref.gptq(w, u, 3, 64, False)
  assert np.array_equal(np.asarray(r["codes"]), codes)
  np.testing.assert_allclose(np.asarray(r["w_hat"]), w_hat, atol=2e-6)


def test_gptq_beats_rtn_on_layer_loss():
  w, h = ref.random_layer(16, 256, seed=4)
  u = ref.inverse_upper(h)
  w_gptq = ref.gptq(w, u, 3, 128, False)[3]
  _, _, _, w_rtn = ref.rtn(w.astype(np.float64), 3, 128, False)
  qw, info = quantize_weight(w, h, method="gptq", bits=3, group_size=128, return_info=True)
  loss = lambda wh: np.trace((w - wh) @ h.astype(np.float64) @ (w - wh).T)
  np.testing.assert_allclose(info["layer_loss"], loss(w_gptq), rtol=1e-3)
  assert info["layer_loss"] < 0.9 * loss(w_rtn)


def test_act_order_and_dead_columns_via_api():
  """desc_act (static_groups=False) with a dead column: permute by descending diag H (dead -> 1), run the
  reference on the permuted problem, undo the permutation; g_idx[j] = position of j in the order // g."""
  w, h = ref.random_layer(16, 256, seed=5)
  h[7, :] = 0.0
  h[:, 7] = 0.0
  qw, info = quantize_weight(w, h, method="gptq", bits=4, group_size=64, act_order=True, scale_dtype="float32",
                             return_info=True)
  dg = np.diag(h).astype(np.float64).copy()
  dg[dg == 0] = 1.0
  perm = np.argsort(-dg, kind="stable")
  inv = np.argsort(perm)
  wp = w[:, perm].astype(np.float64)
  wp[:, inv[7]] = 0.0
  codes, sc, zr, w_hat, _, _ = ref.gptq(wp, ref.inverse_upper(h[perm][:, perm]), 4, 64, False)
  assert np.array_equal(np.asarray(qw.g_idx), inv // 64)
  dq = np.asarray(qw.dequantize())
  assert np.all(dq[:, 7] == 0.0)
  np.testing.assert_allclose(dq, w_hat[:, inv], atol=2e-6)
  assert np.array_equal(np.asarray(info["w_hat"]), dq)
  assert info["dead_columns"] == 1
  # layer_loss comes from the solve (2 loss - delta ||E||^2, permuted, dead column): the float64 trace
  d = w.astype(np.float64) - dq
  np.testing.assert_allclose(info["layer_loss"], np.trace(d @ h.astype(np.float64) @ d.T), rtol=1e-4)
  np.testing.assert_allclose(info["relative_sq_output_error"], info["layer_loss"] / np.trace(
      w.astype(np.float64) @ h.astype(np.float64) @ w.astype(np.float64).T), rtol=1e-5)
