"""DAQ against closed forms, brute force and NumPy transcriptions of the released per-block algorithm and of
the cross-block compensation loop."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quant_ref as ref

from qdllm_jax.quant import daq
from qdllm_jax.quant.packed import from_binary_planes


def _lstsq_rows(wt, b, a_c, e):
  """Per row i: argmin_a sum_j e_ij (Wt_ij - a a_c_j B_ij)^2 via numpy lstsq on sqrt(e)-weighted rows."""
  out = []
  for i in range(wt.shape[0]):
    s = np.sqrt(e[i])
    out.append(np.linalg.lstsq((s * a_c * b[i])[:, None], s * wt[i], rcond=None)[0][0])
  return np.array(out)


def test_scale_updates_are_weighted_least_squares():
  rng = np.random.default_rng(0)
  wt = rng.standard_normal((6, 10))
  b = np.where(rng.standard_normal((6, 10)) > 0, 1.0, -1.0)
  e = np.where(rng.random((6, 10)) < 0.2, 3.0, 1.0)
  a_c, a_r = rng.random(10) + 0.1, rng.random(6) + 0.1
  with ref.x64():
    ar = np.asarray(daq.update_row_scale(wt, b, a_c, e))
    ac = np.asarray(daq.update_col_scale(wt, b, a_r, e))
  np.testing.assert_allclose(ar, _lstsq_rows(wt, b, a_c, e), rtol=1e-7)
  np.testing.assert_allclose(ac, _lstsq_rows(wt.T, b.T, a_r, e.T), rtol=1e-7)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_rerround_equals_brute_force(order):
  rng = np.random.default_rng(order)
  ar = rng.random((order, 5)) + 0.2
  ac = rng.random((order, 7)) + 0.2
  w1 = rng.standard_normal((5, 7))
  # exact ties: dyadic scales and entries at midpoints / zero, where the lowest pattern index must win
  ar[:, 0], ac[:, 0] = 1.0, np.array([1.0, 0.5, 0.25][:order])
  w1[0, :] = 0.0
  w1[1:, 0] = [0.0, 0.5, -0.25, 1.5][:4]
  with ref.x64():
    b = np.asarray(daq.rerround(w1, ar, ac))
  np.testing.assert_array_equal(b, ref.rerround_brute(w1, ar, ac))


def test_salience_weights_match_released_rule():
  rng = np.random.default_rng(3)
  w1 = rng.standard_normal((32, 128))
  w1[rng.random(w1.shape) < 0.02] *= 6.0
  d = rng.random(128) + 0.5
  for tau, lam in [(2.0, 3.0), (3.0, 2.0), (50.0, 3.0)]:
    with ref.x64():
      e = np.asarray(daq.salience_weights(w1, d, tau, lam))
    np.testing.assert_array_equal(e, ref.salience(w1, d, tau, lam))
  assert np.all(e == 1.0)  # no outliers at tau = 50


@pytest.mark.parametrize("order", [1, 2, 3])
def test_block_matches_released_transcription(order):
  rng = np.random.default_rng(10 + order)
  w1 = 0.02 * rng.standard_normal((24, 128))
  w1[:, 5] = 0.0  # a dead column: sign(0) = 0 in the released code vs +1 here gives the same result
  e = ref.salience(w1, rng.random(128) + 0.5)
  wh_ref, ar_ref, ac_ref, b_ref = ref.daq_block(w1, e, order, 15)
  with ref.x64():
    f = jax.jit(functools.partial(daq.daq_block, order=order, iters=15))
    wh, ar, ac, signs = (np.asarray(x) for x in f(w1, e))
  np.testing.assert_allclose(ar, ar_ref, rtol=1e-9, atol=1e-13)
  np.testing.assert_allclose(ac, ac_ref, rtol=1e-9, atol=1e-13)
  live = np.ones(128, bool)
  live[5] = False
  np.testing.assert_array_equal(np.where(signs, 1.0, -1.0)[:, :, live], b_ref[:, :, live])
  np.testing.assert_allclose(wh, wh_ref, rtol=1e-9, atol=1e-13)
  assert np.all(wh[:, 5] == 0.0)


def test_rsr_tol_stops_early():
  rng = np.random.default_rng(5)
  w1 = rng.standard_normal((16, 128))
  e = np.ones_like(w1)
  with ref.x64():
    one = daq.daq_block(w1, e, 1, 1)
    early = daq.daq_block(w1, e, 1, 15, rsr_tol=10.0)  # any decrease < 10x: stop after one iteration
    full = daq.daq_block(w1, e, 1, 15, rsr_tol=0.0)  # run while the objective decreases
  np.testing.assert_array_equal(np.asarray(early[0]), np.asarray(one[0]))
  obj = lambda r: float(np.sum((w1 - np.asarray(r[0])) ** 2))
  assert obj(full) < obj(one)


@pytest.mark.parametrize("comp,dor,z_diag", [(True, True, "chol"), (False, False, "inv_diag")])
def test_compensation_loop_matches_transcription(comp, dor, z_diag):
  w, h = ref.random_layer(16, 512, seed=7)
  u = ref.inverse_upper(h)
  orders = np.array([1, 3, 2, 2])
  q_ref, loss_ref = ref.daq_quantize(w, u, orders, 15, compensation=comp, dor=dor, z_diag=z_diag)
  with ref.x64():
    r = daq.daq_quantize(jnp.asarray(w, jnp.float64), jnp.asarray(u), orders, compensation=comp, dor=dor,
                         z_diag=z_diag, scale_dtype=None)
    np.testing.assert_allclose(np.asarray(r["w_hat"]), q_ref, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(float(r["loss"]), loss_ref, rtol=1e-8)


def test_block_compensation_is_the_exact_obs_update():
  """comp_mode="block" (E = delta U_bb^-1 through U) equals the OBS update computed from inverses of H_RR."""
  w, h = ref.random_layer(16, 512, seed=3)
  u = ref.inverse_upper(h)
  orders = np.array([2, 1, 3, 2])
  hd = np.float64(h) + 0.01 * np.mean(np.diag(np.float64(h))) * np.eye(h.shape[0])  # the H that u factors
  q_ref = ref.daq_quantize_obs(w, hd, orders, 15)
  with ref.x64():
    r = daq.daq_quantize(jnp.asarray(w, jnp.float64), jnp.asarray(u), orders, dor=False, scale_dtype=None,
                         comp_mode="block")
    np.testing.assert_allclose(np.asarray(r["w_hat"]), q_ref, rtol=1e-7, atol=1e-10)
    diag = daq.daq_quantize(jnp.asarray(w, jnp.float64), jnp.asarray(u), orders, dor=False, scale_dtype=None)
  assert np.abs(np.asarray(diag["w_hat"]) - q_ref).max() > 1e-3  # the released diagonal form differs
  with pytest.raises(Exception, match="comp_mode"):
    daq.daq_quantize(w, u, orders, comp_mode="full")


def test_float32_solver_and_exact_packing():
  """float32 solver == float64 transcription (to float32 precision) with unrounded scales; with float16 scales
  w_hat is recomputed from the rounded scales, so dequant(pack) is bit-exact and the stored weight is the one
  the compensation and the loss saw."""
  w, h = ref.random_layer(16, 512, seed=8)
  u = ref.inverse_upper(h).astype(np.float32)
  orders = np.array([2, 1, 3, 2])
  q_ref, loss_ref = ref.daq_quantize(w, u.astype(np.float64), orders)
  r32 = daq.daq_quantize(jnp.asarray(w), jnp.asarray(u), orders, scale_dtype=None)
  np.testing.assert_allclose(np.asarray(r32["w_hat"]), q_ref, rtol=1e-4, atol=1e-6)
  r = daq.daq_quantize(jnp.asarray(w), jnp.asarray(u), orders)
  qw = from_binary_planes(r["bits"], r["a_r"], r["a_c"], orders, shape=w.shape)
  assert np.array_equal(np.asarray(qw.dequantize()), np.asarray(r["w_hat"]))
  assert qw.num_planes == 8 and qw.a_r.dtype == jnp.float16
  blk, k = [0, 0, 1, 2, 2, 2, 3, 3], [0, 1, 0, 0, 1, 2, 0, 1]  # planes flattened block by block
  assert np.array_equal(np.asarray(qw.a_r, np.float32), np.asarray(r["a_r"])[blk, k])
  # fp16 scales move later blocks' inputs slightly (re-rounding near-ties may flip); the loss barely changes
  np.testing.assert_allclose(float(r["loss"]), loss_ref, rtol=1e-2)
