"""Packed storage of quantized weights: the `QuantizedWeight` pytree (spec: docs/packed_format.md).

Two formats, both packing along the input dimension into uint32 words, least significant bit first:
  "binary_planes" (DAQ / Quant-dLLM): P = sum_b orders[b] sign planes, ordered by block then by order k.
      planes uint32 [P, out, bs/32]   bit i of word w of row o = 1 iff B[o, 32 w + i] = +1 (0 -> -1)
      a_r [P, out], a_c [P, bs]       scale_dtype (float16 by default)
      orders int8 [nb]                planes of each bs-column block (1..3), nb = in / bs
      plane_block int32 [P]           block of each plane (= repeat(arange(nb), orders))
      W^[:, blk b] = sum over b's planes in order of where(bit, a_r a_c^T, -(a_r a_c^T))
  "uniform" (RTN / GPTQ):
      qweight uint32 [out, nu * wu]   units of cu = 32 / gcd(bits, 32) codes in wu = bits / gcd(bits, 32) words
                      (2 bits: 16 codes / 1 word; 3 bits: 32 codes / 3 words, no unused bit), nu = ceil(in / cu);
                      a unit is a little-endian bit string (code t at bits [bits t, bits t + bits), crossing
                      words where it must), stored word-major: word k of unit u at k * nu + u (`pack_codes`)
      scales [out, G] scale_dtype, zeros uint8 [out, G] (integer zero points; None when sym: zero = 2^(bits-1))
      g_idx int32 [in] (act-order only; else group of column j is j // g), G = in / g (1 for g = -1)
      W^[o, j] = scales[o, g_idx[j]] * (q[o, j] - zeros[o, g_idx[j]])
Arrays are pytree children; shape, method, format, bits, group_size, sym, scale_dtype and layout_version are
static aux data. `bits_per_weight` = 8 * nbytes / (out * in) counts every stored array.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import FormatError

LAYOUT_VERSION = 2
FORMATS = ("binary_planes", "uniform")
_ARRAYS = ("planes", "a_r", "a_c", "orders", "plane_block", "qweight", "scales", "zeros", "g_idx")
_META = ("shape", "method", "format", "bits", "group_size", "sym", "scale_dtype", "layout_version")


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


try:
  _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover (future jax without jax.core.Tracer)
  from jax._src.core import Tracer as _Tracer


def _concrete(x) -> bool:
  return not isinstance(x, _Tracer)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """A packed quantized linear weight W^ [out, in] (PyTorch layout). See the module doc for the fields."""
  planes: Optional[jax.Array] = None
  a_r: Optional[jax.Array] = None
  a_c: Optional[jax.Array] = None
  orders: Optional[jax.Array] = None
  plane_block: Optional[jax.Array] = None
  qweight: Optional[jax.Array] = None
  scales: Optional[jax.Array] = None
  zeros: Optional[jax.Array] = None
  g_idx: Optional[jax.Array] = None
  shape: tuple = (0, 0)
  method: str = ""
  format: str = "uniform"
  bits: int = 2
  group_size: int = 128
  sym: bool = False
  scale_dtype: str = "float16"
  layout_version: int = LAYOUT_VERSION

  @property
  def num_planes(self) -> int:
    """P, the number of sign planes (binary_planes only)."""
    return int(self.planes.shape[0])

  @property
  def nbytes(self) -> int:
    """Bytes of all stored arrays."""
    return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in (getattr(self, k) for k in _ARRAYS) if x is not None))

  @property
  def bits_per_weight(self) -> float:
    """8 * nbytes / (out * in): planes or codes (with unused word bits) + scales + zeros + orders + indices."""
    return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

  def validate(self) -> "QuantizedWeight":
    """Check layout version, format and that every field matches `shape`; raises FormatError."""
    if self.format not in FORMATS:
      raise FormatError(f"QuantizedWeight format {self.format!r} is unknown; expected one of {FORMATS}.")
    if len(self.shape) != 2 or min(self.shape) <= 0:
      raise FormatError(f"QuantizedWeight shape {self.shape!r} must be (out, in) with positive sizes.")
    if not layout_readable(self.layout_version, self.format, self.bits):
      raise FormatError(f"QuantizedWeight layout_version={self.layout_version!r} ({self.format}, {self.bits} bits) "
                        f"is not readable by this build (layout version "
                        f"{LAYOUT_VERSION}). Re-quantize or re-pack the weight with this version.")
    out, n = self.shape
    sd = jnp.dtype(self.scale_dtype)

    def need(name, shp, dtype):
      x = getattr(self, name)
      if x is None or tuple(x.shape) != tuple(shp) or jnp.dtype(x.dtype) != jnp.dtype(dtype):
        got = None if x is None else (tuple(x.shape), str(x.dtype))
        raise FormatError(f"QuantizedWeight ({self.format}, shape {self.shape}) field {name!r} is {got}; "
                          f"expected shape {tuple(shp)} dtype {jnp.dtype(dtype)}. The weight is corrupt or "
                          f"was packed with a different layout; re-pack it.")
      return x

    if self.format == "binary_planes":
      bs = self.group_size
      if bs <= 0 or bs % 32 or n % bs:
        raise FormatError(f"binary_planes block {bs} must be a positive multiple of 32 dividing in={n}.")
      p = self.planes.shape[0] if self.planes is not None else -1
      need("planes", (p, out, bs // 32), jnp.uint32)
      need("a_r", (p, out), sd)
      need("a_c", (p, bs), sd)
      orders = need("orders", (n // bs,), jnp.int8)
      pb = need("plane_block", (p,), jnp.int32)
      if _concrete(orders) and _concrete(pb):
        o = np.asarray(orders).astype(np.int64)
        if o.min() < 1 or o.max() > 3 or o.sum() != p:
          raise FormatError(f"binary_planes orders must lie in 1..3 and sum to the {p} planes; got "
                            f"min {o.min()}, max {o.max()}, sum {o.sum()}.")
        if not np.array_equal(np.asarray(pb), np.repeat(np.arange(n // bs), o)):
          raise FormatError("binary_planes plane_block must equal repeat(arange(nb), orders).")
    else:
      if not 2 <= self.bits <= 8:
        raise FormatError(f"uniform bits={self.bits} must lie in 2..8.")
      g = n if self.group_size == -1 else self.group_size
      if g <= 0 or n % g:
        raise FormatError(f"uniform group_size {self.group_size} must divide in={n} (or be -1).")
      need("qweight", (out, words_per_row(self.bits, n)), jnp.uint32)
      need("scales", (out, n // g), sd)
      if self.sym:
        if self.zeros is not None:
          raise FormatError("uniform sym=True weights store no zeros (zero point is 2^(bits-1)).")
      else:
        z = need("zeros", (out, n // g), jnp.uint8)
        if _concrete(z) and int(np.asarray(z).max(initial=0)) > 2 ** self.bits - 1:
          raise FormatError(f"uniform zeros exceed maxq={2 ** self.bits - 1}.")
      if self.g_idx is not None:
        gi = need("g_idx", (n,), jnp.int32)
        if _concrete(gi) and (int(np.asarray(gi).min()) < 0 or int(np.asarray(gi).max()) >= n // g):
          raise FormatError(f"uniform g_idx values must lie in [0, {n // g}).")
    return self

  def dequantize(self, dtype=jnp.float32):
    """W^ [out, in] in `dtype` (computed in float32; bit-identical to the solver's float32 result)."""
    out, n = self.shape
    if self.format == "binary_planes":
      bs = self.group_size
      nb = n // bs
      orders = jnp.asarray(self.orders, jnp.int32)
      starts = jnp.cumsum(orders) - orders
      acc = jnp.zeros((nb, out, bs), jnp.float32)
      for k in range(3):
        valid = k < orders
        idx = jnp.where(valid, starts + k, 0)
        c = (self.a_r[idx].astype(jnp.float32)[:, :, None] * self.a_c[idx].astype(jnp.float32)[:, None, :])
        t = jnp.where(unpack_signs(self.planes[idx]), c, -c)
        acc = acc + jnp.where(valid[:, None, None], t, jnp.zeros((), jnp.float32))
      return acc.transpose(1, 0, 2).reshape(out, n).astype(dtype)
    q = unpack_codes(self.qweight, self.bits, n).astype(jnp.float32)
    g = n if self.group_size == -1 else self.group_size
    gi = jnp.arange(n) // g if self.g_idx is None else jnp.asarray(self.g_idx)
    sc = self.scales.astype(jnp.float32)[:, gi]
    zr = (jnp.full((), 2 ** (self.bits - 1), jnp.float32) if self.sym
          else self.zeros.astype(jnp.float32)[:, gi])
    return (sc * (q - zr)).astype(dtype)


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=list(_ARRAYS), meta_fields=list(_META))


@functools.partial(jax.jit, static_argnames=("bits",))
def _pack_codes_jit(codes, bits):
  return pack_codes(codes, bits)


@functools.partial(jax.jit, static_argnames=("scale_dtype",))
def _gather_planes(bits, a_r, a_c, blk, k, scale_dtype):
  sd = jnp.dtype(scale_dtype)
  return bits[blk, k], a_r[blk, k].astype(sd), a_c[blk, k].astype(sd)


def from_binary_planes(bits, a_r, a_c, orders, *, shape, scale_dtype="float16", method="quant_dllm",
                       nominal_bits: int = 2) -> QuantizedWeight:
  """Build a binary_planes weight from per-block solver outputs.

  bits uint32 [nb, 3, out, bs/32], a_r [nb, 3, out], a_c [nb, 3, bs] (planes past a block's order unused),
  orders int [nb] (host values). Planes are flattened block by block, k = 1..orders[b].
  """
  o = np.asarray(orders).astype(np.int64)
  blk = np.repeat(np.arange(o.size), o)
  k = np.concatenate([np.arange(x) for x in o])
  sd = jnp.dtype(scale_dtype)
  planes, ar, ac = _gather_planes(jnp.asarray(bits), jnp.asarray(a_r), jnp.asarray(a_c), jnp.asarray(blk),
                                  jnp.asarray(k), scale_dtype=sd.name)
  qw = QuantizedWeight(
      planes=planes, a_r=ar, a_c=ac, orders=jnp.asarray(o, jnp.int8),
      plane_block=jnp.asarray(blk, jnp.int32), shape=tuple(shape), method=method, format="binary_planes",
      bits=int(nominal_bits), group_size=int(np.asarray(a_c).shape[-1]), sym=False, scale_dtype=sd.name)
  return qw.validate()


def from_uniform(codes, scales, zeros, *, bits: int, group_size: int, sym: bool, g_idx=None,
                 scale_dtype="float16", method="gptq") -> QuantizedWeight:
  """Build a uniform weight from codes [out, in], scales/zeros [out, G] and an optional g_idx [in]."""
  sd = jnp.dtype(scale_dtype)
  codes = jnp.asarray(codes)
  qw = QuantizedWeight(
      qweight=_pack_codes_jit(codes, bits=int(bits)), scales=jnp.asarray(scales).astype(sd),
      zeros=None if sym else jnp.asarray(zeros).astype(jnp.uint8),
      g_idx=None if g_idx is None else jnp.asarray(g_idx, jnp.int32), shape=tuple(codes.shape), method=method,
      format="uniform", bits=int(bits), group_size=int(group_size), sym=bool(sym), scale_dtype=sd.name)
  return qw.validate()


__all__ = [
    "LAYOUT_VERSION", "FORMATS", "QuantizedWeight", "pack_signs", "unpack_signs", "unit_shape",
    "words_per_row", "uniform_nbytes", "binary_planes_nbytes", "layout_readable", "unit_words", "slot_code",
    "pack_codes",
    "unpack_codes", "plane_sum", "from_binary_planes", "from_uniform",
]
