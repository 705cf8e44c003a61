"""The test references agree with the packed format: packing random data and dequantizing gives the NumPy W^."""
import numpy as np
import pytest


@pytest.mark.parametrize("out,n_in,orders", [(72, 256, [1, 3]), (40, 384, [3, 2, 1])])
def test_planes_reference_matches_dequantize(planes, out, n_in, orders):
  qw, w = planes(out, n_in, orders)
  assert qw.num_planes == sum(orders)
  np.testing.assert_allclose(np.asarray(qw.dequantize(), np.float64), w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits,group,sym,act", [(2, 32, False, False), (3, 64, True, False), (4, 128, False, True),
                                                (8, -1, False, False)])
def test_uniform_reference_matches_dequantize(uniform, bits, group, sym, act):
  qw, w = uniform(48, 384 if group != 64 else 640, bits, group, sym=sym, act_order=act)
  np.testing.assert_allclose(np.asarray(qw.dequantize(), np.float64), w, rtol=1e-6, atol=1e-7)
