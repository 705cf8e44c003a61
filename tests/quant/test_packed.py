"""Packed format: bit layout, exact round trips, dequantization, honest bits/weight, validation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.errors import FormatError
from qdllm_jax.quant import packed
from qdllm_jax.quant.packed import QuantizedWeight, from_binary_planes, from_uniform


def test_sign_bit_order_and_round_trip():
  signs = np.zeros((2, 64), bool)
  signs[0, 0] = signs[0, 33] = signs[1, 31] = True
  words = np.asarray(packed.pack_signs(signs))
  assert words.dtype == np.uint32
  np.testing.assert_array_equal(words, [[1, 2], [2 ** 31, 0]])  # bit i of word w <-> column 32 w + i
  rnd = np.random.default_rng(0).random((3, 5, 128)) < 0.5
  np.testing.assert_array_equal(np.asarray(packed.unpack_signs(packed.pack_signs(rnd))), rnd)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_code_packing_round_trip(bits):
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2 ** bits, (7, 100))
  words = np.asarray(packed.pack_codes(codes, bits))
  cu, wu = packed.unit_shape(bits)
  assert cu * bits == 32 * wu and cu == 32 // np.gcd(bits, 32)     # a unit fills its words exactly
  nu = -(-100 // cu)
  assert words.shape == (7, nu * wu) == (7, packed.words_per_row(bits, 100))
  # brute force, independent of the packer: the row as one little-endian bit string per unit (python ints)
  for row in (0, 3):
    for u in range(nu):
      unit = sum(int(words[row, k * nu + u]) << (32 * k) for k in range(wu))   # word k of unit u at k * nu + u
      for t in range(cu):
        j = u * cu + t
        want = codes[row, j] if j < 100 else 0                              # zero codes pad the last unit
        assert (unit >> (bits * t)) & (2 ** bits - 1) == want
  np.testing.assert_array_equal(np.asarray(packed.unpack_codes(words, bits, 100)), codes)


def test_one_word_units_keep_the_version_1_layout():
  """2/4/8 bits: code j at bit (j % cpw) * bits of word j // cpw, as in layout version 1 (still readable)."""
  codes = np.random.default_rng(0).integers(0, 256, (2, 100))
  for bits in (2, 4, 8):
    c = codes % 2 ** bits
    words = np.asarray(packed.pack_codes(c, bits))
    cpw = 32 // bits
    assert words.shape == (2, -(-100 // cpw))
    for j in range(100):
      assert (int(words[1, j // cpw]) >> ((j % cpw) * bits)) & (2 ** bits - 1) == c[1, j]
    assert packed.layout_readable(1, "uniform", bits)
  assert packed.layout_readable(1, "binary_planes", 2)
  assert not packed.layout_readable(1, "uniform", 3) and not packed.layout_readable(3, "uniform", 2)
  qw = from_uniform(codes % 8, np.ones((2, 1)), np.zeros((2, 1)), bits=3, group_size=-1, sym=False)
  with pytest.raises(FormatError, match="layout_version=1"):
    dataclasses.replace(qw, layout_version=1).validate()
  q2 = from_uniform(codes % 4, np.ones((2, 1)), np.zeros((2, 1)), bits=2, group_size=-1, sym=False)
  dataclasses.replace(q2, layout_version=1).validate()


def test_binary_dequantize_matches_numpy_formula():
  rng = np.random.default_rng(1)
  out, bs, orders = 4, 64, np.array([1, 3, 2])
  nb = len(orders)
  signs = rng.random((nb, 3, out, bs)) < 0.5
  a_r = rng.random((nb, 3, out)).astype(np.float32)
  a_c = rng.random((nb, 3, bs)).astype(np.float32)
  qw = from_binary_planes(packed.pack_signs(signs), a_r, a_c, orders, shape=(out, nb * bs))
  expect = np.zeros((out, nb * bs))
  for b in range(nb):
    for k in range(orders[b]):
      ar16 = a_r[b, k].astype(np.float16).astype(np.float64)
      ac16 = a_c[b, k].astype(np.float16).astype(np.float64)
      expect[:, b * bs:(b + 1) * bs] += np.outer(ar16, ac16) * np.where(signs[b, k], 1.0, -1.0)
  np.testing.assert_allclose(np.asarray(qw.dequantize()), expect, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(qw.plane_block), [0, 1, 1, 1, 2, 2])
  assert qw.dequantize(jnp.bfloat16).dtype == jnp.bfloat16


def test_uniform_dequantize_with_g_idx():
  rng = np.random.default_rng(2)
  codes = rng.integers(0, 8, (3, 64))
  sc = rng.random((3, 2)).astype(np.float32)
  zr = rng.integers(0, 8, (3, 2))
  g_idx = rng.permutation(np.arange(64) // 32)
  qw = from_uniform(codes, sc, zr, bits=3, group_size=32, sym=False, g_idx=g_idx, scale_dtype="float32")
  expect = sc[:, g_idx] * (codes - zr[:, g_idx])
  np.testing.assert_array_equal(np.asarray(qw.dequantize()), expect.astype(np.float32))
  qs = from_uniform(codes, sc, None, bits=3, group_size=32, sym=True, scale_dtype="float32")
  gi = np.arange(64) // 32
  np.testing.assert_array_equal(np.asarray(qs.dequantize()), (sc[:, gi] * (codes - 4.0)).astype(np.float32))


def test_bits_per_weight_hand_count():
  # binary: out 8, in 256, block 128, orders [1, 3] -> P = 4 planes
  qw = from_binary_planes(np.zeros((2, 3, 8, 4), np.uint32), np.ones((2, 3, 8)), np.ones((2, 3, 128)),
                          np.array([1, 3]), shape=(8, 256))
  hand = 4 * 8 * 4 * 4 + 4 * 8 * 2 + 4 * 128 * 2 + 2 * 1 + 4 * 4  # planes, a_r, a_c (fp16), orders, plane_block
  assert qw.nbytes == hand == 1618
  assert qw.bits_per_weight == pytest.approx(1618 * 8 / (8 * 256))
  # uniform 3-bit, out 4, in 64, g 32: 32 codes in 3 words (no unused bit) -> 2 units = 6 words per row
  qu = from_uniform(np.zeros((4, 64), int), np.ones((4, 2)), np.zeros((4, 2)), bits=3, group_size=32, sym=False)
  assert qu.nbytes == 4 * 6 * 4 + 4 * 2 * 2 + 4 * 2 * 1 == 120
  assert qu.bits_per_weight == pytest.approx(120 * 8 / 256)
  qa = from_uniform(np.zeros((4, 64), int), np.ones((4, 2)), None, bits=4, group_size=32, sym=True,
                    g_idx=np.arange(64) // 32)
  assert qa.nbytes == 4 * 8 * 4 + 4 * 2 * 2 + 64 * 4  # no zeros (sym), int32 g_idx


def test_pytree_and_jit():
  qw = from_binary_planes(np.zeros((2, 3, 8, 4), np.uint32), np.ones((2, 3, 8)), np.ones((2, 3, 128)),
                          np.array([2, 2]), shape=(8, 256))
  leaves, tree = jax.tree.flatten(qw)
  assert len(leaves) == 5  # planes, a_r, a_c, orders, plane_block; metadata is static
  back = jax.tree.unflatten(tree, leaves)
  assert back.shape == (8, 256) and back.format == "binary_planes"
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(qw)), np.asarray(qw.dequantize()))
  assert np.all(np.asarray(qw.dequantize()) == -2.0)  # two planes, all bits 0 (-1), unit scales


def test_validate_refuses_bad_layouts():
  qw = from_binary_planes(np.zeros((2, 3, 8, 4), np.uint32), np.ones((2, 3, 8)), np.ones((2, 3, 128)),
                          np.array([1, 2]), shape=(8, 256))
  with pytest.raises(FormatError, match="layout_version"):
    dataclasses.replace(qw, layout_version=packed.LAYOUT_VERSION + 1).validate()
  with pytest.raises(FormatError, match="format 'ternary' is unknown"):
    packed.weight_from_fields("ternary", {}, {})
  with pytest.raises(FormatError, match="no field"):  # a uniform field on a planes weight
    packed.weight_from_fields("binary_planes", {"qweight": qw.planes, **{k: getattr(qw, k) for k in
                                                                          qw.ARRAY_FIELDS}}, {"shape": qw.shape})
  assert isinstance(qw, packed.BinaryPlanesWeight) and qw.format == "binary_planes"
  with pytest.raises(FormatError, match="a_r"):
    dataclasses.replace(qw, a_r=qw.a_r[:, :4]).validate()
  with pytest.raises(FormatError, match="orders"):
    dataclasses.replace(qw, orders=jnp.asarray([2, 2], jnp.int8)).validate()
  with pytest.raises(FormatError, match="planes"):
    dataclasses.replace(qw, shape=(8, 512)).validate()
  qu = from_uniform(np.zeros((4, 64), int), np.ones((4, 2)), np.zeros((4, 2)), bits=3, group_size=32, sym=False)
  with pytest.raises(FormatError, match="scales"):
    dataclasses.replace(qu, scales=qu.scales.astype(jnp.float32)).validate()
  with pytest.raises(FormatError, match="qweight"):
    dataclasses.replace(qu, bits=2).validate()
  assert isinstance(qu.validate(), QuantizedWeight)
