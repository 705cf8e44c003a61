"""qmatmul dispatch: backend default, forced paths, errors, jit with the weight as a pytree argument."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.errors import ConfigError, FormatError
from qdllm_jax.kernels import default_path, kernel_supports, qmatmul
from qdllm_jax.models.layers import linear


def test_default_path_on_cpu():
  assert jax.default_backend() == "cpu"
  assert default_path() == "xla"


def test_default_path_jit_leading_dims(planes, assert_matmul):
  qw, w = planes(72, 256, [2, 3])
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 256)), jnp.float32)
  y = jax.jit(qmatmul)(x, qw)                     # the weight travels as a pytree argument
  assert y.shape == (2, 3, 72)
  assert_matmul(y.reshape(6, 72), x.reshape(6, 256), w, bf16=False)


def test_layers_linear_uses_packed_path(uniform, assert_matmul):
  qw, w = uniform(48, 256, 4, 64)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 256)), jnp.float32)
  b = jnp.arange(48, dtype=jnp.float32) / 10
  y = jax.jit(linear)(x, qw, b)
  assert_matmul(y - b, x, w, bf16=False)


def test_block_size_64(planes, assert_matmul):
  """bs = 64 (2 words per row): the XLA and GPU paths run it; the TPU kernel refuses with ConfigError."""
  qw, w = planes(40, 192, [1, 2, 3], bs=64)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 192)), jnp.float32)
  for path in ("xla", "pallas_gpu_interpret"):
    assert_matmul(qmatmul(x, qw, path=path), x, w, bf16=False)
  assert kernel_supports(qw, "pallas_tpu") is not None
  with pytest.raises(ConfigError, match="block size"):
    qmatmul(x, qw, path="pallas_tpu")


def test_empty_batch(planes):
  qw, _ = planes(40, 128, [2])
  y = qmatmul(jnp.zeros((0, 128), jnp.bfloat16), qw)
  assert y.shape == (0, 40) and y.dtype == jnp.bfloat16


def test_errors(planes):
  qw, w = planes(40, 128, [2])
  x = jnp.zeros((2, 128), jnp.float32)
  with pytest.raises(ConfigError, match="unknown"):
    qmatmul(x, qw, path="cuda")
  with pytest.raises(FormatError, match="last dim of x"):
    qmatmul(jnp.zeros((2, 64), jnp.float32), qw)
  with pytest.raises(FormatError, match="not floating"):
    qmatmul(jnp.zeros((2, 128), jnp.int32), qw)
  with pytest.raises(FormatError, match="QuantizedWeight"):
    qmatmul(x, jnp.asarray(w, jnp.float32))
