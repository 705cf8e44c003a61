"""prepare_hessian / hessian_update / layer_loss against NumPy float64 references."""
import jax.numpy as jnp
import numpy as np
import pytest
import quant_ref as ref

from qdllm_jax.errors import QuantizationError
from qdllm_jax.quant.hessian import hessian_update, layer_errors, layer_loss, prepare_hessian, relative_sq_output_error


def test_u_matches_gptq_factor():
  w, h = ref.random_layer(8, 192, seed=1)
  ph = prepare_hessian(w, h)
  u_ref = ref.inverse_upper(h)
  u = np.asarray(ph.u, np.float64)
  assert np.allclose(np.tril(u, -1), 0.0)
  np.testing.assert_allclose(u, u_ref, rtol=2e-3, atol=2e-4 * np.abs(u_ref).max())
  assert ph.percdamp == 0.01
  np.testing.assert_allclose(ph.delta, 0.01 * np.mean(np.diag(h)), rtol=1e-5)


def test_u_float64_exact():
  w, h = ref.random_layer(4, 96, seed=2)
  with ref.x64():
    ph = prepare_hessian(jnp.asarray(w, jnp.float64), jnp.asarray(h, jnp.float64))
    np.testing.assert_allclose(np.asarray(ph.u), ref.inverse_upper(h), rtol=1e-9, atol=1e-12)


def test_dead_columns():
  w, h = ref.random_layer(8, 64, seed=3)
  dead = [5, 40]
  h = h.copy()
  h[dead, :] = 0.0
  h[:, dead] = 0.0
  ph = prepare_hessian(w, h)
  assert np.array_equal(np.flatnonzero(np.asarray(ph.dead)), dead)
  assert np.all(np.asarray(ph.w)[:, dead] == 0.0)
  keep = np.setdiff1d(np.arange(64), dead)
  assert np.array_equal(np.asarray(ph.w)[:, keep], w[:, keep])
  np.testing.assert_allclose(np.asarray(ph.u, np.float64), ref.inverse_upper(h), rtol=2e-3, atol=1e-5)
  h_fixed = h.copy()
  h_fixed[dead, dead] = 1.0
  np.testing.assert_allclose(ph.delta, 0.01 * np.mean(np.diag(h_fixed)), rtol=1e-5)


def test_damping_escalates_on_non_pd():
  rng = np.random.default_rng(4)
  q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
  eig = np.linspace(1.0, 2.0, 32)
  eig[0] = -0.05  # mean diag = mean eig ~ 1.47: delta 0.0147 fails, 0.147 succeeds
  h = (q * eig) @ q.T
  ph = prepare_hessian(np.ones((2, 32), np.float32), h.astype(np.float32))
  assert ph.percdamp == pytest.approx(0.1)
  hd = h + 0.1 * np.mean(np.diag(h)) * np.eye(32)
  u = np.asarray(ph.u, np.float64)
  np.testing.assert_allclose(u.T @ u, np.linalg.inv(hd), rtol=1e-3, atol=1e-4)


def test_hopeless_hessian_raises():
  h = -np.eye(16, dtype=np.float32)
  with pytest.raises(QuantizationError, match="not positive definite"):
    prepare_hessian(np.ones((2, 16), np.float32), h)


def test_hessian_update_running_mean():
  rng = np.random.default_rng(5)
  xs = [rng.standard_normal((7, 12)).astype(np.float32) for _ in range(5)]
  h, n = jnp.zeros((12, 12)), 0
  h, n = hessian_update(h, n, xs[0])
  h, n = hessian_update(h, n, np.stack(xs[1:3]))
  h, n = hessian_update(h, n, np.stack(xs[3:]))
  assert n == 5
  expect = 2.0 / 5 * sum(x.astype(np.float64).T @ x for x in xs)
  np.testing.assert_allclose(np.asarray(h), expect, rtol=1e-5, atol=1e-5)


def test_layer_loss_and_relative_error():
  rng = np.random.default_rng(6)
  w, w_hat = rng.standard_normal((5, 9)), rng.standard_normal((5, 9))
  x = rng.standard_normal((20, 9))
  h = x.T @ x
  d = w - w_hat
  np.testing.assert_allclose(float(layer_loss(w, w_hat, h)), np.trace(d @ h @ d.T), rtol=1e-4)
  np.testing.assert_allclose(float(relative_sq_output_error(w, w_hat, h)),
                             np.sum((x @ d.T) ** 2) / np.sum((x @ w.T) ** 2), rtol=1e-4)
  loss, rel = layer_errors(w, w_hat, h)
  np.testing.assert_allclose([float(loss), float(rel)], [np.sum((x @ d.T) ** 2),
                                                         np.sum((x @ d.T) ** 2) / np.sum((x @ w.T) ** 2)], rtol=1e-4)


@pytest.mark.parametrize("n,block", [(300, 64), (256, 64), (130, 64)])
def test_blocked_cholesky_matches_numpy(n, block):
  """cholesky_lower's left-looking panels (ragged last panel, exact multiple, <= 2 blocks: the library call)
  against numpy's float64 Cholesky; a matrix that is not PD gives NaN from its first bad panel on."""
  from qdllm_jax.quant.hessian import cholesky_lower
  rng = np.random.default_rng(n)
  x = rng.standard_normal((2 * n, n)) * np.linspace(0.2, 3.0, n)
  a = x.T @ x / (2 * n) + 1e-3 * np.eye(n)
  want = np.linalg.cholesky(a)
  got = np.asarray(cholesky_lower(jnp.asarray(a, jnp.float32), block=block), np.float64)
  assert np.allclose(np.tril(got), got)
  assert np.max(np.abs(got - want)) <= 2e-5 * np.max(np.abs(want))
  bad = a.copy()
  bad[n - 5, n - 5] = -1.0
  assert np.isnan(np.asarray(cholesky_lower(jnp.asarray(bad, jnp.float32), block=block))[-1, -1])
