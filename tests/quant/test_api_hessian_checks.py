"""quantize_weight refuses Hessians it cannot use (all zero, not symmetric) and warns about dead columns.

References: H built here as X^T X from a random X with numpy (symmetric by construction), its transpose-broken
variants, and columns zeroed in X (dead inputs, counted here).
"""
import logging

import numpy as np
import pytest

from qdllm_jax.errors import QuantizationError
from qdllm_jax.quant import quantize_weight

RNG = np.random.default_rng(0)
W = RNG.standard_normal((16, 64)).astype(np.float32)
X = RNG.standard_normal((256, 64)).astype(np.float32)


@pytest.mark.parametrize("method", ["gptq", "quant_dllm"])
def test_all_zero_hessian_is_an_error(method):
  with pytest.raises(QuantizationError, match="hessian is all zero \\(64 of 64 columns dead\\)"):
    quantize_weight(W, np.zeros((64, 64), np.float32), method=method, bits=2, group_size=32)


@pytest.mark.parametrize("method", ["gptq", "quant_dllm"])
def test_non_symmetric_hessian_is_an_error(method):
  h = X.T @ X
  h[3, 5] += 0.01 * np.abs(h).max()
  with pytest.raises(QuantizationError, match="not symmetric.*tolerance"):
    quantize_weight(W, h, method=method, bits=2, group_size=32)
  # asymmetry at float32 rounding level (far below the tolerance) is accepted
  h = X.T @ X
  h[3, 5] *= 1 + 1e-6
  quantize_weight(W, h, method=method, bits=2, group_size=32)


def test_dead_columns_are_counted_in_a_warning(caplog):
  x = X.copy()
  x[:, [1, 7, 40]] = 0
  with caplog.at_level(logging.WARNING, logger="qdllm_jax.quant.api"):
    qw, info = quantize_weight(W, x.T @ x, method="gptq", bits=2, group_size=32, return_info=True)
  assert "3 of 64 dead columns" in caplog.text and info["dead_columns"] == 3
  np.testing.assert_array_equal(np.asarray(qw.dequantize())[:, [1, 7, 40]], 0)
