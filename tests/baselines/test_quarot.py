"""QuaRot: Hadamard construction, exactness of the fused rotation, and W4A4 error with/without rotation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from qdllm_jax.baselines import quarot, weight_activation
from qdllm_jax.errors import ConfigError, QuantizationError
from qdllm_jax.models import transformer
from tests.baselines import np_ref
from tests.baselines.conftest import residual_outlier_params


@pytest.mark.parametrize("n", [1, 8, 12, 20, 24, 48, 64, 96])
def test_hadamard_is_orthogonal_pm1(n):
  h = quarot.hadamard_matrix(n)
  np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
  np.testing.assert_allclose(np.abs(h) * np.sqrt(n), 1.0, atol=1e-12)
  if n & (n - 1) == 0:
    np.testing.assert_allclose(h * np.sqrt(n), scipy.linalg.hadamard(n))


def test_rotation_orthogonal_and_fallback():
  for n, had in ((32, True), (12, True), (10, False), (36, False)):
    q, ok = quarot.rotation(n, jax.random.PRNGKey(n))
    q = np.asarray(q, np.float64)
    assert ok == had
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-5)
  assert quarot.hadamard_matrix(10) is None
  a, _ = quarot.rotation(32, jax.random.PRNGKey(0))
  b, _ = quarot.rotation(32, jax.random.PRNGKey(1))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0.1  # the sign vector is random


def test_rotated_fp_model_is_unchanged(cfg, ids):
  params = residual_outlier_params(cfg, seed=1)
  rot, down_rots, info = quarot.rotate_params(params, cfg, jax.random.PRNGKey(3))
  assert info == {"residual_hadamard": True, "down_hadamard": True}
  assert np.abs(np.asarray(rot["embed"]) - np.asarray(params["embed"])).max() > 1e-2
  ref = np_ref.forward(params, cfg, ids)
  np.testing.assert_allclose(np_ref.forward(rot, cfg, ids, down_rot=np.asarray(down_rots[0]["down"], np.float64)), ref,
                             atol=1e-4 * np.abs(ref).max())
  got = np.asarray(weight_activation.forward_actquant(rot, cfg, jnp.asarray(ids), None, rots=down_rots))
  np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max())
  # without the online rotation in the forward the function changes (it really is applied)
  bad = np.asarray(weight_activation.forward_actquant(rot, cfg, jnp.asarray(ids), None))
  assert np.abs(bad - ref).max() > 1e-2


def test_rotation_removes_outlier_channel(cfg, ids):
  params = residual_outlier_params(cfg, seed=2)
  fused = quarot.fuse_norms(params, cfg)
  rot, _, _ = quarot.rotate_params(params, cfg, jax.random.PRNGKey(0))
  taps0, taps1 = [], []
  np_ref.forward(fused, cfg, ids, hook=lambda x: taps0.append(x) or x)
  np_ref.forward(rot, cfg, ids, hook=lambda x: taps1.append(x) or x)
  kurt = lambda x: float(np.abs(x).max() / np.sqrt(np.mean(x * x)))
  assert kurt(taps1[0]) < 0.5 * kurt(taps0[0])  # qkv input: max/rms drops


@pytest.mark.parametrize("bits", [4])
def test_quarot_w4a4_beats_unrotated(cfg, ids, bits):
  params = residual_outlier_params(cfg, seed=4)
  ref = np_ref.forward(params, cfg, ids)
  x = jnp.asarray(ids)
  e = {}
  for rotate in (False, True):
    qp, dr, _ = quarot.quarot(params, cfg, jax.random.PRNGKey(0), w_bits=bits, rotate=rotate)
    out = np.asarray(weight_activation.forward_actquant(qp, cfg, x, bits, a_sym=True, rots=dr))
    e[rotate] = float(np.mean((out - ref) ** 2))
  assert e[True] < 0.7 * e[False], e


def test_tied_model_refused(cfg):
  import dataclasses
  tied = dataclasses.replace(cfg, tie_embeddings=True)
  with pytest.raises(ConfigError, match="untied"):
    quarot.fuse_norms(transformer.init_params(cfg, jax.random.PRNGKey(0)), tied)


def test_quarot_gptq_beats_rtn(cfg, ids):
  params = residual_outlier_params(cfg, seed=6)
  ref = np_ref.forward(params, cfg, ids)
  x = jnp.asarray(ids)
  e = {}
  for m in ("rtn", "gptq"):
    qp, dr, _ = quarot.quarot(params, cfg, jax.random.PRNGKey(0), w_bits=3, w_method=m, calib_ids=ids)
    assert np.abs(np.asarray(qp["blocks"][0]["q"])).max() > 0
    out = np.asarray(weight_activation.forward_actquant(qp, cfg, x, None, rots=dr))
    e[m] = float(np.mean((out - ref) ** 2))
  assert e["gptq"] < 0.8 * e["rtn"], e
  with pytest.raises(QuantizationError, match="calib_ids"):
    quarot.quarot(params, cfg, jax.random.PRNGKey(0), w_method="gptq")
  # the binary-plane method has no per-channel symmetric grid: refused, naming the registered ones that have
  with pytest.raises(QuantizationError, match=r"quant_dllm.*\('gptq', 'rtn'\)"):
    quarot.quarot(params, cfg, jax.random.PRNGKey(0), w_method="quant_dllm", calib_ids=ids)
