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
One pytree type per format (`BinaryPlanesWeight`, `UniformWeight`) under the `QuantizedWeight` protocol; the
arrays are pytree children, the rest (shape, method, bits, group_size, sym, scale_dtype, layout_version) static
aux data. The bit layout itself is quant/bit_layout.py. `bits_per_weight` = 8 * nbytes / (out * in) counts
every stored array.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import FormatError
from qdllm_jax.quant.bit_layout import (  # noqa: F401
  LAYOUT_VERSION,
  binary_planes_nbytes,
  layout_readable,
  pack_codes,
  pack_signs,
  plane_sum,
  slot_code,
  uniform_nbytes,
  unit_shape,
  unit_words,
  unpack_codes,
  unpack_signs,
  words_per_row,
)

FORMATS = ("binary_planes", "uniform")


try:
  _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover (future jax without jax.core.Tracer)
  from jax._src.core import Tracer as _Tracer


def _concrete(x) -> bool:
  return not isinstance(x, _Tracer)


class QuantizedWeight:
  """The protocol of a packed quantized linear weight W^ [out, in] (PyTorch layout), one pytree type per format
  (`BinaryPlanesWeight`, `UniformWeight`): `shape`, `format`, `nbytes`, `bits_per_weight`, `dequantize`,
  `validate`. ARRAY_FIELDS are the pytree children, META_FIELDS the static aux data; both are what a checkpoint
  stores (checkpoint/tree.py)."""
  format: ClassVar[str] = ""
  ARRAY_FIELDS: ClassVar[tuple[str, ...]] = ()
  META_FIELDS: ClassVar[tuple[str, ...]] = ()

  @property
  def nbytes(self) -> int:
    """Bytes of all stored arrays."""
    return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in (getattr(self, k) for k in self.ARRAY_FIELDS) if x is not None))

  @property
  def bits_per_weight(self) -> float:
    """8 * nbytes / (out * in): planes or codes (with unused word bits) + scales + zeros + orders + indices."""
    return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

  def _check_common(self) -> None:
    if len(self.shape) != 2 or min(self.shape) <= 0:
      raise FormatError(f"QuantizedWeight shape {self.shape!r} must be (out, in) with positive sizes.")
    if not layout_readable(self.layout_version, self.format, self.bits):
      raise FormatError(f"QuantizedWeight layout_version={self.layout_version!r} ({self.format}, {self.bits} bits) "
                        f"is not readable by this build (layout version "
                        f"{LAYOUT_VERSION}). Re-quantize or re-pack the weight with this version.")

  def _need(self, name, shp, dtype):
    x = getattr(self, name)
    if x is None or tuple(x.shape) != tuple(shp) or jnp.dtype(x.dtype) != jnp.dtype(dtype):
      got = None if x is None else (tuple(x.shape), str(x.dtype))
      raise FormatError(f"QuantizedWeight ({self.format}, shape {self.shape}) field {name!r} is {got}; "
                        f"expected shape {tuple(shp)} dtype {jnp.dtype(dtype)}. The weight is corrupt or "
                        f"was packed with a different layout; re-pack it.")
    return x


@dataclasses.dataclass(frozen=True)
class BinaryPlanesWeight(QuantizedWeight):
  """DAQ / Quant-dLLM sign planes with row and column scales (module docstring: "binary_planes")."""
  planes: jax.Array
  a_r: jax.Array
  a_c: jax.Array
  orders: jax.Array
  plane_block: jax.Array
  shape: tuple = (0, 0)
  method: str = "quant_dllm"
  bits: int = 2
  group_size: int = 128
  scale_dtype: str = "float16"
  layout_version: int = LAYOUT_VERSION
  format: ClassVar[str] = "binary_planes"
  ARRAY_FIELDS: ClassVar[tuple[str, ...]] = ("planes", "a_r", "a_c", "orders", "plane_block")
  META_FIELDS: ClassVar[tuple[str, ...]] = ("shape", "method", "bits", "group_size", "scale_dtype",
                                            "layout_version")

  @property
  def num_planes(self) -> int:
    """P, the number of sign planes."""
    return int(self.planes.shape[0])

  def validate(self) -> "BinaryPlanesWeight":
    """Check layout version and that every field matches `shape`; raises FormatError."""
    self._check_common()
    out, n = self.shape
    sd = jnp.dtype(self.scale_dtype)
    bs = self.group_size
    if bs <= 0 or bs % 32 or n % bs:
      raise FormatError(f"binary_planes block {bs} must be a positive multiple of 32 dividing in={n}.")
    p = self.planes.shape[0] if self.planes is not None else -1
    self._need("planes", (p, out, bs // 32), jnp.uint32)
    self._need("a_r", (p, out), sd)
    self._need("a_c", (p, bs), sd)
    orders = self._need("orders", (n // bs,), jnp.int8)
    pb = self._need("plane_block", (p,), jnp.int32)
    if _concrete(orders) and _concrete(pb):
      o = np.asarray(orders).astype(np.int64)
      if o.min() < 1 or o.max() > 3 or o.sum() != p:
        raise FormatError(f"binary_planes orders must lie in 1..3 and sum to the {p} planes; got "
                          f"min {o.min()}, max {o.max()}, sum {o.sum()}.")
      if not np.array_equal(np.asarray(pb), np.repeat(np.arange(n // bs), o)):
        raise FormatError("binary_planes plane_block must equal repeat(arange(nb), orders).")
    return self

  def dequantize(self, dtype=jnp.float32):
    """W^ [out, in] in `dtype` (computed in float32; bit-identical to the solver's float32 result)."""
    out, n = self.shape
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


@dataclasses.dataclass(frozen=True)
class UniformWeight(QuantizedWeight):
  """RTN / GPTQ integer codes with per-group scales and zero points (module docstring: "uniform")."""
  qweight: jax.Array
  scales: jax.Array
  zeros: Optional[jax.Array] = None
  g_idx: Optional[jax.Array] = None
  shape: tuple = (0, 0)
  method: str = "gptq"
  bits: int = 2
  group_size: int = 128
  sym: bool = False
  scale_dtype: str = "float16"
  layout_version: int = LAYOUT_VERSION
  format: ClassVar[str] = "uniform"
  ARRAY_FIELDS: ClassVar[tuple[str, ...]] = ("qweight", "scales", "zeros", "g_idx")
  META_FIELDS: ClassVar[tuple[str, ...]] = ("shape", "method", "bits", "group_size", "sym", "scale_dtype",
                                            "layout_version")

  def validate(self) -> "UniformWeight":
    """Check layout version and that every field matches `shape`; raises FormatError."""
    self._check_common()
    out, n = self.shape
    sd = jnp.dtype(self.scale_dtype)
    if not 2 <= self.bits <= 8:
      raise FormatError(f"uniform bits={self.bits} must lie in 2..8.")
    g = n if self.group_size == -1 else self.group_size
    if g <= 0 or n % g:
      raise FormatError(f"uniform group_size {self.group_size} must divide in={n} (or be -1).")
    self._need("qweight", (out, words_per_row(self.bits, n)), jnp.uint32)
    self._need("scales", (out, n // g), sd)
    if self.sym:
      if self.zeros is not None:
        raise FormatError("uniform sym=True weights store no zeros (zero point is 2^(bits-1)).")
    else:
      z = self._need("zeros", (out, n // g), jnp.uint8)
      if _concrete(z) and int(np.asarray(z).max(initial=0)) > 2 ** self.bits - 1:
        raise FormatError(f"uniform zeros exceed maxq={2 ** self.bits - 1}.")
    if self.g_idx is not None:
      gi = self._need("g_idx", (n,), jnp.int32)
      if _concrete(gi) and (int(np.asarray(gi).min()) < 0 or int(np.asarray(gi).max()) >= n // g):
        raise FormatError(f"uniform g_idx values must lie in [0, {n // g}).")
    return self

  def dequantize(self, dtype=jnp.float32):
    """W^ [out, in] in `dtype` (computed in float32; bit-identical to the solver's float32 result)."""
    n = self.shape[1]
    q = unpack_codes(self.qweight, self.bits, n).astype(jnp.float32)
    g = n if self.group_size == -1 else self.group_size
    gi = jnp.arange(n) // g if self.g_idx is None else jnp.asarray(self.g_idx)
    sc = self.scales.astype(jnp.float32)[:, gi]
    zr = (jnp.full((), 2 ** (self.bits - 1), jnp.float32) if self.sym
          else self.zeros.astype(jnp.float32)[:, gi])
    return (sc * (q - zr)).astype(dtype)


WEIGHT_TYPES = {t.format: t for t in (BinaryPlanesWeight, UniformWeight)}
for _t in WEIGHT_TYPES.values():
  jax.tree_util.register_dataclass(_t, data_fields=list(_t.ARRAY_FIELDS), meta_fields=list(_t.META_FIELDS))


def weight_from_fields(fmt: str, fields: dict, meta: dict) -> QuantizedWeight:
  """The validated weight of format `fmt` from its stored arrays and metadata (checkpoint readers).

  Raises FormatError for an unknown format or a field the format does not have."""
  cls = WEIGHT_TYPES.get(fmt)
  if cls is None:
    raise FormatError(f"QuantizedWeight format {fmt!r} is unknown; expected one of {FORMATS}.")
  unknown = sorted(set(fields) - set(cls.ARRAY_FIELDS)) + sorted(set(meta) - set(cls.META_FIELDS))
  if unknown:
    raise FormatError(f"a {fmt} weight has no field(s) {unknown}; expected arrays {cls.ARRAY_FIELDS} and "
                      f"metadata {cls.META_FIELDS}. The checkpoint was written by another layout; re-pack it.")
  missing = [k for k in cls.ARRAY_FIELDS if k not in fields and cls.__dataclass_fields__[k].default is not None]
  if missing:
    raise FormatError(f"a {fmt} weight misses the array(s) {missing}; the checkpoint is incomplete.")
  return cls(**fields, **meta).validate()


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
  qw = BinaryPlanesWeight(
      planes=planes, a_r=ar, a_c=ac, orders=jnp.asarray(o, jnp.int8),
      plane_block=jnp.asarray(blk, jnp.int32), shape=tuple(shape), method=method,
      bits=int(nominal_bits), group_size=int(np.asarray(a_c).shape[-1]), scale_dtype=sd.name)
  return qw.validate()


def from_uniform(codes, scales, zeros, *, bits: int, group_size: int, sym: bool, g_idx=None,
                 scale_dtype="float16", method="gptq") -> QuantizedWeight:
  """Build a uniform weight from codes [out, in], scales/zeros [out, G] and an optional g_idx [in]."""
  sd = jnp.dtype(scale_dtype)
  codes = jnp.asarray(codes)
  qw = UniformWeight(
      qweight=_pack_codes_jit(codes, bits=int(bits)), scales=jnp.asarray(scales).astype(sd),
      zeros=None if sym else jnp.asarray(zeros).astype(jnp.uint8),
      g_idx=None if g_idx is None else jnp.asarray(g_idx, jnp.int32), shape=tuple(codes.shape), method=method,
      bits=int(bits), group_size=int(group_size), sym=bool(sym), scale_dtype=sd.name)
  return qw.validate()


__all__ = [
    "LAYOUT_VERSION", "FORMATS", "QuantizedWeight", "BinaryPlanesWeight", "UniformWeight", "WEIGHT_TYPES",
    "weight_from_fields", "from_binary_planes", "from_uniform",
]
