"""The bit layout of packed weights (spec: docs/packed_format.md): signs and integer codes in uint32 words.

Signs: bit i of word w is sign[32 w + i] (1 = +1). Codes of b bits: a row is cut into units of
32 / gcd(b, 32) codes in b / gcd(b, 32) words (2 bits: 16 codes in 1 word; 3 bits: 32 codes in 3 words), each
unit a little-endian bit string, the words stored word-major. `uniform_nbytes` / `binary_planes_nbytes` give a
weight's stored bytes from its shape alone (the planner and the method registry count with them).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

LAYOUT_VERSION = 2


def pack_signs(signs):
  """bool [..., c] (c % 32 == 0) -> uint32 [..., c / 32]; bit i of word w is signs[..., 32 w + i]."""
  sh = signs.shape
  s = jnp.asarray(signs).reshape(sh[:-1] + (sh[-1] // 32, 32)).astype(jnp.uint32)
  return jnp.sum(s << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def unpack_signs(words):
  """uint32 [..., w] -> bool [..., 32 w] (inverse of `pack_signs`)."""
  b = (jnp.asarray(words)[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  return b.reshape(b.shape[:-2] + (-1,)).astype(bool)


def unit_shape(bits: int) -> tuple[int, int]:
  """(codes, words) of one packing unit: the shortest run of codes that fills whole words, 32 / gcd(bits, 32)
  codes in bits / gcd(bits, 32) words (2 bits: 16 codes in 1 word; 3 bits: 32 codes in 3 words; 6: 16 in 3)."""
  d = math.gcd(int(bits), 32)
  return 32 // d, int(bits) // d


def words_per_row(bits: int, n: int) -> int:
  """uint32 words of one packed row of n codes: ceil(n / codes per unit) units of `words` words each."""
  cu, wu = unit_shape(bits)
  return -(-n // cu) * wu


def uniform_nbytes(rows: int, cols: int, bits: int, group_size: int, scale_dtype: str = "float16",
                   sym: bool = False, act_order: bool = False) -> int:
  """Bytes of a uniform weight's arrays (`QuantizedWeight.nbytes`) from its shape alone: qweight
  rows x words_per_row x 4, scales rows x G (scale_dtype), zeros rows x G uint8 unless sym, g_idx 4 cols with
  act-order; G = cols / group_size (1 for -1)."""
  groups = 1 if group_size == -1 else cols // group_size
  sb = np.dtype(jnp.dtype(scale_dtype)).itemsize
  out = rows * words_per_row(bits, cols) * 4 + rows * groups * sb + (0 if sym else rows * groups)
  return out + (4 * cols if act_order else 0)


def binary_planes_nbytes(rows: int, cols: int, num_planes: int, block: int, scale_dtype: str = "float16") -> int:
  """Bytes of a binary_planes weight's arrays (`QuantizedWeight.nbytes`) from its shape and plane count P:
  planes P x rows x block/32 x 4, a_r P x rows and a_c P x block (scale_dtype), orders nb int8, plane_block
  4 P; nb = cols / block."""
  sb = np.dtype(jnp.dtype(scale_dtype)).itemsize
  p = num_planes
  return p * rows * (block // 32) * 4 + p * (rows + block) * sb + cols // block + 4 * p


def layout_readable(version, fmt: str, bits: int) -> bool:
  """True iff a weight stored with layout `version` is read correctly by this build: version 2, or version 1
  where the two agree (binary planes; uniform with bits dividing 32, i.e. one-word units: 2, 4, 8 bits)."""
  if version == LAYOUT_VERSION:
    return True
  return version == 1 and (fmt == "binary_planes" or unit_shape(bits)[1] == 1)


def unit_words(words, bits: int) -> list:
  """The wu word arrays of a word-major packed row: uint32 [..., nu * wu] -> [word 0, ..., word wu-1], each
  [..., nu] (word k of every unit; a static slice)."""
  wu = unit_shape(bits)[1]
  nu = words.shape[-1] // wu
  return [words[..., k * nu:(k + 1) * nu] for k in range(wu)]


def slot_code(words, t: int, bits: int):
  """Code of slot t (0 <= t < codes per unit) of every unit, uint32 [...]: its bits start at offset bits * t of
  the unit's bit string; words[k] holds bits [32 k, 32 k + 32) (a list of wu equally shaped uint32 arrays).
  A code that crosses a word boundary takes its high bits from the next word."""
  k, sh = divmod(bits * t, 32)
  v = words[k] >> jnp.uint32(sh)
  if sh + bits > 32:
    v = v | (words[k + 1] << jnp.uint32(32 - sh))
  return v & jnp.uint32(2 ** bits - 1)


def pack_codes(codes, bits: int):
  """Integer codes [..., n] in [0, 2^bits) -> uint32 [..., words_per_row(bits, n)].

  The row is cut into units of cu codes (unit_shape; zero codes pad the last unit). Unit u is one little-endian
  bit string of wu words, code t at bits [bits t, bits t + bits) (a code may cross into the next word); the words
  are stored word-major: word k of unit u at position k * nu + u (nu units per row). With one-word units
  (2, 4, 8 bits) this is simply code j at bit (j % cu) * bits of word j // cu."""
  cu, wu = unit_shape(bits)
  codes = jnp.asarray(codes).astype(jnp.uint32)
  n = codes.shape[-1]
  nu = -(-n // cu)
  c = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, nu * cu - n)]).reshape(codes.shape[:-1] + (nu, cu))
  words = []
  for k in range(wu):
    acc = jnp.zeros(codes.shape[:-1] + (nu,), jnp.uint32)
    for t in range(cu):
      lo = bits * t
      if lo // 32 == k:
        acc = acc | (c[..., t] << jnp.uint32(lo % 32))
      elif (lo + bits - 1) // 32 == k:  # the high bits of a code that started in word k - 1
        acc = acc | (c[..., t] >> jnp.uint32(32 - lo % 32))
    words.append(acc)
  return jnp.concatenate(words, axis=-1)


def unpack_codes(words, bits: int, n: int):
  """uint32 [..., words_per_row(bits, n)] -> uint8 codes [..., n] (inverse of `pack_codes`)."""
  cu, wu = unit_shape(bits)
  wk = unit_words(jnp.asarray(words), bits)
  nu = wk[0].shape[-1]
  c = jnp.stack([slot_code(wk, t, bits) for t in range(cu)], axis=-1)
  return c.reshape(c.shape[:-2] + (nu * cu,))[..., :n].astype(jnp.uint8)


def plane_sum(a_r, a_c, signs):
  """W^ = sum_k where(signs_k, a_r^k a_c^k^T, -(a_r^k a_c^k^T)), k in order, starting from 0.

  a_r [K, r], a_c [K, c], signs bool [K, r, c] -> [r, c]. The product is rounded before the sign is applied,
  so this is bit-identical wherever it is evaluated (also under FMA contraction).
  """
  acc = jnp.zeros((a_r.shape[1], a_c.shape[1]), a_r.dtype)
  for k in range(a_r.shape[0]):
    c = a_r[k][:, None] * a_c[k][None, :]
    acc = acc + jnp.where(signs[k], c, -c)
  return acc
