"""Solvers sharded over output rows (shard_map on 8 simulated CPU devices) equal the single-device solvers."""
import jax
import numpy as np
import pytest
import quant_ref as ref

from qdllm_jax.errors import QuantizationError
from qdllm_jax.quant import daq, gptq, row_sharded
from qdllm_jax.sharding import make_mesh

MESHES = [((1, 8), "model"), ((2, 4), "model"), ((4, 2), "data")]


@pytest.fixture(scope="module")
def layer():
  w, h = ref.random_layer(64, 256, seed=11)
  return w, np.asarray(ref.inverse_upper(h), np.float32)


@pytest.mark.parametrize("shape,axis", MESHES)
def test_gptq_rows_equal_single_device(layer, shape, axis):
  w, u = layer
  mesh = make_mesh(shape, ("data", "model"))
  for g in (64, -1):
    kw = dict(bits=2, group_size=g, sym=False, scale_dtype="float16")
    one = gptq.gptq_quantize(w, u, **kw)
    got = row_sharded.gptq_rows(w, u, mesh=mesh, axis=axis, **kw)
    assert len(got["w_hat"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(got["codes"]), np.asarray(one["codes"]))
    np.testing.assert_allclose(np.asarray(got["w_hat"]), np.asarray(one["w_hat"]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(got["loss"]), float(one["loss"]), rtol=1e-5)


@pytest.mark.parametrize("shape,axis,comp_mode", [m + (c,) for m, c in zip(MESHES, ("diag", "block", "diag"))])
def test_daq_rows_equal_single_device(layer, shape, axis, comp_mode):
  """Column scales, DOR statistics and greedy means are reduced across the row shards."""
  w, u = layer
  mesh = make_mesh(shape, ("data", "model"))
  orders = np.array([1, 3, 2, 2])
  kw = dict(block=64, iters=5, scale_dtype=None, comp_mode=comp_mode)
  one = daq.daq_quantize(w, u, orders, **kw)
  got = row_sharded.daq_rows(w, u, orders, mesh=mesh, axis=axis, **kw)
  assert len(got["w_hat"].sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got["a_c"]), np.asarray(one["a_c"]), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got["a_r"]), np.asarray(one["a_r"]), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got["w_hat"]), np.asarray(one["w_hat"]), rtol=2e-4, atol=1e-5)
  assert np.mean(np.asarray(got["bits"]) != np.asarray(one["bits"])) < 1e-3  # a sign may flip on a float tie
  np.testing.assert_allclose(float(got["loss"]), float(one["loss"]), rtol=1e-4)


def test_rows_must_split(layer):
  w, u = layer
  mesh = make_mesh((1, 8), ("data", "model"))
  with pytest.raises(QuantizationError, match="do not split"):
    row_sharded.gptq_rows(w[:60], u, mesh=mesh, axis="model", bits=2, group_size=64)
  with pytest.raises(QuantizationError, match="not an axis"):
    row_sharded.daq_rows(w, u, np.array([2, 2, 2, 2]), mesh=mesh, axis="tensor", block=64)
  assert jax.device_count() == 8
