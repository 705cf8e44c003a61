"""RTN / GPTQ uniform quantizer against the NumPy closed form."""
import jax.numpy as jnp
import numpy as np
import pytest
import quant_ref as ref

from qdllm_jax.quant.rtn import find_params, rtn_quantize


@pytest.mark.parametrize("bits,g,sym", [(2, 32, False), (3, 64, True), (4, -1, False), (8, 16, True),
                                        (3, 32, False)])
def test_rtn_matches_closed_form(bits, g, sym):
  rng = np.random.default_rng(bits * 100 + (g % 97))
  w = (0.05 * rng.standard_normal((12, 128))).astype(np.float32)
  w[0, :] = np.abs(w[0, :])  # all non-negative row (sym keeps xmin = 0, GPTQ quirk)
  w[1, :32] = 0.0  # an all-zero group -> xmin=-1, xmax=+1
  c_ref, s_ref, z_ref, wh_ref = ref.rtn(w.astype(np.float64), bits, g, sym)
  gi = np.arange(w.shape[1]) // (w.shape[1] if g == -1 else g)
  tie = ref.is_tie(w.astype(np.float64) / s_ref[:, gi], 1e-5)
  # XLA:CPU divides by a broadcast divisor through a reciprocal, so x / scale may differ from IEEE division by
  # an ulp: codes may differ only where x / scale is a rounding tie (k + 1/2), which the symmetric grid
  # produces exactly at each group's extreme weight (-maxq/2). Everywhere else they must be identical.
  with ref.x64():
    codes, sc, zr, w_hat = rtn_quantize(jnp.asarray(w, jnp.float64), bits=bits, group_size=g, sym=sym,
                                        scale_dtype=None)
    diff = np.asarray(codes) != c_ref
    assert not np.any(diff & ~tie)
    np.testing.assert_allclose(np.asarray(sc), s_ref, rtol=1e-15)
    np.testing.assert_array_equal(np.asarray(zr), z_ref)
    np.testing.assert_allclose(np.asarray(w_hat)[~diff], wh_ref[~diff], rtol=1e-15, atol=1e-17)
  codes, sc, zr, w_hat = rtn_quantize(jnp.asarray(w), bits=bits, group_size=g, sym=sym, scale_dtype=None)
  # the zero point round(-xmin / scale) is itself a tie for the all-zero group (maxq / 2); allow those groups
  zdiff = np.asarray(zr) != z_ref
  assert np.all(np.abs(np.asarray(zr) - z_ref)[zdiff] == 1)
  if not sym:
    g_ = w.shape[1] if g == -1 else g
    xmin = np.minimum(w.reshape(w.shape[0], -1, g_).min(-1), 0).astype(np.float64)
    xmax = np.maximum(w.reshape(w.shape[0], -1, g_).max(-1), 0).astype(np.float64)
    xmin = np.where((xmin == 0) & (xmax == 0), -1.0, xmin)
    assert np.all(ref.is_tie(-xmin / s_ref, 1e-5)[zdiff])
  tie = tie | zdiff[:, gi]
  diff = np.asarray(codes) != c_ref
  assert not np.any(diff & ~tie)
  assert np.all(np.abs(np.asarray(codes).astype(int) - c_ref)[diff] == 1)
  np.testing.assert_allclose(np.asarray(sc), s_ref, rtol=1e-6)
  ok = ~tie
  np.testing.assert_allclose(np.asarray(w_hat)[ok], wh_ref[ok], rtol=1e-6, atol=1e-7)


def test_scale_rounding_to_float16():
  rng = np.random.default_rng(7)
  w = (0.03 * rng.standard_normal((6, 64))).astype(np.float32)
  codes, sc, zr, w_hat = rtn_quantize(jnp.asarray(w), bits=3, group_size=32, sym=False, scale_dtype="float16")
  c_ref, s_ref, z_ref, wh_ref = ref.rtn(w, 3, 32, False, scale_dtype=np.float16)
  assert np.array_equal(np.asarray(sc), s_ref) and np.array_equal(np.asarray(sc).astype(np.float16), s_ref)
  assert np.array_equal(np.asarray(codes), c_ref)
  assert np.array_equal(np.asarray(w_hat), wh_ref.astype(np.float32))


def test_find_params_special_cases():
  x = jnp.asarray([[0.0, 0.0, 0.0], [0.5, 1.0, 2.0], [-3.0, 1.0, 0.0]])
  sc, zr = find_params(x, 2, sym=False)
  np.testing.assert_allclose(np.asarray(sc), [2 / 3, 2 / 3, 4 / 3], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(zr), [np.round(1.5), 0.0, np.round(3 / (4 / 3))])
  sc, zr = find_params(x, 2, sym=True)
  np.testing.assert_allclose(np.asarray(sc), [2 / 3, 2 / 3, 2.0], rtol=1e-6)  # row 2: xmin stays 0
  np.testing.assert_array_equal(np.asarray(zr), [2.0, 2.0, 2.0])
