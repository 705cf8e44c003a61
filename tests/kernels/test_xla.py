"""The portable jnp path equals x @ W^T (float64 NumPy reference) in both its decode and prefill regimes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.kernels import qmatmul, weight_layout, xla

PLANE_SHAPES = [(72, 256, [1, 3]), (136, 640, [2, 1, 3, 2, 3]), (200, 384, [3, 1, 2])]
CASES = [(s, b) for s in PLANE_SHAPES for b in [(1,), (3,), (2, 37)]] + [(PLANE_SHAPES[1], (8,))]


@pytest.mark.parametrize("shape,batch", CASES)
def test_planes_xla(planes, assert_matmul, shape, batch):
  out, n_in, orders = shape
  qw, w = planes(out, n_in, orders)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(batch + (n_in,)), jnp.float32)
  y = jax.jit(lambda x, q: qmatmul(x, q, path="xla"))(x, qw)
  assert y.shape == batch + (out,) and y.dtype == jnp.float32
  assert_matmul(y.reshape(-1, out), x.reshape(-1, n_in), w, bf16=False)


@pytest.mark.parametrize("batch", [(1,), (2, 37)])
def test_planes_xla_bf16(planes, assert_matmul, batch):
  qw, w = planes(136, 640, [2, 1, 3, 2, 3])
  x = jnp.asarray(np.random.default_rng(1).standard_normal(batch + (640,)), jnp.bfloat16)
  y = jax.jit(lambda x, q: qmatmul(x, q, path="xla"))(x, qw)
  assert y.dtype == jnp.bfloat16
  assert_matmul(y.reshape(-1, 136), x.reshape(-1, 640), w, bf16=True)


@pytest.mark.parametrize("fn", [xla.planes_gemv, xla.planes_dequant_dot])
def test_planes_both_regimes(planes, assert_matmul, fn):
  qw, w = planes(96, 512, [3, 1, 2, 2])
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 512)), jnp.float32)
  assert_matmul(jax.jit(fn)(x, qw), x, w, bf16=False)


UNIFORM = [(2, 32, False, False), (2, 128, True, False), (3, 64, False, False), (3, -1, True, False),
           (4, 64, False, False), (4, 128, False, True), (2, 64, False, True), (8, -1, False, False)]


@pytest.mark.parametrize("bits,group,sym,act", UNIFORM)
@pytest.mark.parametrize("batch", [(1,), (2, 37)])
def test_uniform_xla(uniform, assert_matmul, bits, group, sym, act, batch):
  qw, w = uniform(136, 640, bits, group, sym=sym, act_order=act)
  x = jnp.asarray(np.random.default_rng(3).standard_normal(batch + (640,)), jnp.float32)
  y = jax.jit(lambda x, q: qmatmul(x, q, path="xla"))(x, qw)
  assert_matmul(y.reshape(-1, 136), x.reshape(-1, 640), w, bf16=False)


def test_uniform_xla_ragged_words_bf16(uniform, assert_matmul):
  """3-bit codes: 384 columns end mid-word (10 codes per word); bf16 activations."""
  qw, w = uniform(72, 384, 3, 128)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((5, 384)), jnp.bfloat16)
  assert_matmul(jax.jit(lambda x, q: qmatmul(x, q, path="xla"))(x, qw), x, w, bf16=True)


@pytest.mark.parametrize("bits,n_in,group", [(3, 640, 128), (3, 384, 64), (3, 1000, -1), (5, 640, 32),
                                             (6, 96, 16), (7, 320, 64)])
@pytest.mark.parametrize("fn", [xla.uniform_gemv, xla.uniform_dequant_dot])
def test_uniform_multiword_units(uniform, assert_matmul, bits, n_in, group, fn):
  """Units of several words (3 bits: 32 codes in 3 words; codes crossing word boundaries), groups of whole units,
  a ragged last unit (1000 columns, one group)."""
  qw, w = uniform(72, n_in, bits, group)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, n_in)), jnp.float32)
  assert_matmul(jax.jit(fn)(x, qw), x, w, bf16=False)


@pytest.mark.parametrize("n", [1, 6])
def test_uniform_groups_splitting_units(uniform, assert_matmul, n):
  """3 bits with groups of 100 columns: units of 32 codes straddle groups, so every token count takes the
  dequantize path with per-slot groups (qmatmul picks it)."""
  qw, w = uniform(40, 400, 3, 100)
  assert not weight_layout.uniform_geometry(qw)["aligned"]
  x = jnp.asarray(np.random.default_rng(7).standard_normal((n, 400)), jnp.float32)
  assert_matmul(jax.jit(lambda x, q: qmatmul(x, q, path="xla"))(x, qw), x, w, bf16=False)


@pytest.mark.parametrize("fn", [xla.uniform_gemv, xla.uniform_dequant_dot])
def test_uniform_both_regimes(uniform, assert_matmul, fn):
  qw, w = uniform(72, 512, 4, 32)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 512)), jnp.float32)
  assert_matmul(jax.jit(fn)(x, qw), x, w, bf16=False)


@pytest.mark.parametrize("bits,group", [(4, 64), (3, 128), (2, -1)])
def test_uniform_gemv_row_chunks(uniform, assert_matmul, monkeypatch, bits, group):
  """The row-chunked loop of uniform_gemv (taken when the accumulators pass GEMV_DIRECT_BYTES; forced here with
  tiny budgets: 72 rows in 8 chunks of 9) equals x @ W^T like the whole-matrix loop."""
  qw, w = uniform(72, 384, bits, group)
  x = jnp.asarray(np.random.default_rng(8).standard_normal((3, 384)), jnp.float32)
  whole = np.asarray(xla.uniform_gemv(x, qw))
  monkeypatch.setattr(xla, "GEMV_DIRECT_BYTES", 0)
  monkeypatch.setattr(xla, "GEMV_CHUNK_BYTES", 4 * 3 * weight_layout.uniform_geometry(qw)["nu"] * 9)
  y = jax.jit(lambda x, q: xla.uniform_gemv(x, q))(x, qw)                 # a fresh trace under the patched budgets
  assert_matmul(y, x, w, bf16=False)
  np.testing.assert_allclose(np.asarray(y), whole, rtol=1e-5, atol=1e-5)


def test_larger_shapes(planes, uniform, assert_matmul):
  """A bigger matrix through both regimes (1 token and a 64-token prefill)."""
  qw, w = planes(384, 1024, [2, 2, 1, 2, 3, 2, 2, 2])
  qu, wu = uniform(384, 1024, 2, 128)
  for n in (1, 64):
    x = jnp.asarray(np.random.default_rng(n).standard_normal((n, 1024)), jnp.float32)
    assert_matmul(qmatmul(x, qw, path="xla"), x, w, bf16=False)
    assert_matmul(qmatmul(x, qu, path="xla"), x, wu, bf16=False)
