"""ABMP: block salience, per-matrix allocation (reference table), global allocation under a true-bits budget."""
import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.errors import QuantizationError
from qdllm_jax.quant import abmp
from qdllm_jax.quant.packed import from_binary_planes


def test_block_salience_closed_form():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((8, 384)).astype(np.float32)
  u = np.triu(rng.random((384, 384)) + 0.5).astype(np.float32)
  d = np.diag(u).astype(np.float64)
  expect = [np.sum(w[:, b * 128:(b + 1) * 128].astype(np.float64) ** 2 / d[b * 128:(b + 1) * 128] ** 2)
            for b in range(3)]
  np.testing.assert_allclose(abmp.block_salience(w, u), expect, rtol=1e-5)
  np.testing.assert_allclose(abmp.block_salience(w, jnp.asarray(d)), expect, rtol=1e-5)


@pytest.mark.parametrize("nb,ratio,counts", [(32, 0.05, (1, 30, 1)), (96, 0.05, (4, 88, 4)),
                                             (28, 0.10, (2, 24, 2)), (148, 0.10, (14, 120, 14)),
                                             (32, 0.0, (0, 32, 0)), (5, 1.0, (2, 1, 2)), (3, 0.2, (0, 3, 0))])
def test_reference_table_counts(nb, ratio, counts):
  sal = np.random.default_rng(nb).random(nb)
  o = abmp.allocate_orders(sal, ratio)
  assert tuple(int(np.sum(o == k)) for k in (1, 2, 3)) == counts
  assert np.sum(o) == 2 * nb  # mean exactly 2


def test_ranking_hand_made():
  sal = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 1.0, 8.0, 2.0, 6.0, 4.0])
  o = abmp.allocate_orders(sal, 0.2)  # r = 2
  np.testing.assert_array_equal(o, [2, 1, 3, 2, 2, 1, 3, 2, 2, 2])
  # ties: stable ascending sort -> equal saliences keep index order (lowest index demoted first)
  o = abmp.allocate_orders(np.array([1.0, 1.0, 1.0, 1.0]), 0.25)
  np.testing.assert_array_equal(o, [1, 2, 2, 3])
  np.testing.assert_array_equal(abmp.allocate_orders(np.arange(5.0)[::-1], 0.2), [3, 2, 2, 2, 1])


def test_bad_ratio_refused():
  with pytest.raises(QuantizationError, match="ratio"):
    abmp.allocate_orders(np.ones(4), 1.5)


def _packed_bits(orders, rows, block=128):
  """True bits/weight of the packed binary_planes weights with these orders (zero-filled arrays)."""
  tot_bits, tot_w = 0, 0
  for nm, o in orders.items():
    nb = len(o)
    qw = from_binary_planes(np.zeros((nb, 3, rows[nm], block // 32), np.uint32), np.zeros((nb, 3, rows[nm])),
                            np.zeros((nb, 3, block)), o, shape=(rows[nm], nb * block))
    tot_bits += 8 * qw.nbytes
    tot_w += rows[nm] * nb * block
  return tot_bits / tot_w


def test_global_equal_rows_matches_pooled_rule_and_target():
  rng = np.random.default_rng(1)
  sal = {"q": rng.random(32), "k": rng.random(32), "v": rng.random(32)}
  rows = {"q": 64, "k": 64, "v": 64}
  orders, bits = abmp.allocate_orders_global(sal, rows, ratio=0.05)
  pooled = abmp.allocate_orders(np.concatenate([sal[n] for n in sorted(sal)]), 0.05)
  np.testing.assert_array_equal(np.concatenate([orders[n] for n in sorted(sal)]), pooled)
  uniform = {n: np.full(32, 2, np.int8) for n in sal}
  assert bits == pytest.approx(_packed_bits(uniform, rows), abs=0)  # exact target: uniform order-2 true bits
  assert bits == pytest.approx(_packed_bits(orders, rows), abs=0)
  assert sum(int(np.sum(o)) for o in orders.values()) == 2 * 96


def test_global_target_bits_budget():
  rng = np.random.default_rng(2)
  sal = {"a": rng.random(8), "b": rng.random(4)}
  rows = {"a": 32, "b": 96}
  uniform = _packed_bits({"a": np.full(8, 2, np.int8), "b": np.full(4, 2, np.int8)}, rows)
  orders, bits = abmp.allocate_orders_global(sal, rows, target_bits=uniform + 0.5)
  assert bits == pytest.approx(_packed_bits(orders, rows), abs=0)
  assert bits <= uniform + 0.5
  w_tot = (32 * 8 + 96 * 4) * 128
  gap = (uniform + 0.5 - bits) * w_tot
  left = [abmp.plane_bits(rows[n]) for n in orders for b in range(len(orders[n])) if orders[n][b] == 2]
  assert not left or gap < min(left) + 1  # nothing that is still at order 2 would fit
  assert all(np.all(o >= 2) for o in orders.values())  # no ratio: nothing demoted
  # promotions go by descending salience among blocks that fit
  keys = sorted([(float(sal[n][b]), n, b) for n in sal for b in range(len(sal[n]))], reverse=True)
  assert orders[keys[0][1]][keys[0][2]] == 3
  # lower target than uniform: demotions in ascending salience order, budget respected
  orders, bits = abmp.allocate_orders_global(sal, rows, target_bits=uniform - 0.3)
  assert bits <= uniform - 0.3
  low = min((float(sal[n][b]), n, b) for n in sal for b in range(len(sal[n])))
  assert orders[low[1]][low[2]] == 1
  with pytest.raises(QuantizationError, match="below the cost"):
    abmp.allocate_orders_global(sal, rows, target_bits=0.5)
