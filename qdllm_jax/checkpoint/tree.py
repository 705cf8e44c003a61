"""A params pytree with `QuantizedWeight` leaves <-> (a nested dict of plain arrays, a JSON structure spec).

The arrays go to Orbax (or safetensors); the spec, a JSON tree, records everything that is not an array:

  {"kind": "dict", "items": {key: spec}}     {"kind": "list" | "tuple", "items": [spec, ...]}
  {"kind": "array", "shape": [...], "dtype": "bfloat16"}
  {"kind": "quantized", "meta": {shape, method, format, bits, group_size, sym, scale_dtype, layout_version},
   "arrays": {field: {"shape": [...], "dtype": "uint32"}}}        (fields that are None are omitted)

List items are stored under the keys "0", "1", ...; a quantized leaf under its fields (planes, a_r, ...).
Decoding checks every array against the spec and rebuilds each QuantizedWeight through `validate()`, so an
unknown layout version raises FormatError.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax import sharding as sharding_lib
from qdllm_jax.errors import CheckpointError, FormatError
from qdllm_jax.quant import packed
from qdllm_jax.quant.packed import QuantizedWeight

# The metadata a checkpoint records per packed weight (the union over the formats; `sym` is False for planes).
STORED_META = ("shape", "method", "format", "bits", "group_size", "sym", "scale_dtype", "layout_version")
# The output-row axis of each packed field (None: the field has no row axis and is replicated).
ROW_AXIS = {"planes": 1, "a_r": 1, "a_c": None, "orders": None, "plane_block": None, "qweight": 0, "scales": 0,
            "zeros": 0, "g_idx": None}


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _key_ok(k) -> bool:
  return isinstance(k, str) and k and "." not in k and "/" not in k


def array_spec(a) -> dict:
  return {"shape": [int(s) for s in a.shape], "dtype": jnp.dtype(a.dtype).name}


def quantized_meta(qw: QuantizedWeight) -> dict:
  """The static metadata of a packed weight as JSON values (shape as a list)."""
  meta = {k: getattr(qw, k, False) for k in STORED_META}
  meta["shape"] = [int(s) for s in meta["shape"]]
  return meta


def weight_from_stored(fields: dict, stored_meta: dict) -> QuantizedWeight:
  """The validated packed weight from its stored arrays and STORED_META (the format picks the type)."""
  meta = {k: v for k, v in stored_meta.items() if k != "format"}
  meta["shape"] = tuple(meta["shape"])
  fmt = stored_meta.get("format")
  if fmt == "binary_planes" and not meta.get("sym", False):
    meta.pop("sym", None)  # recorded for every format; planes have no grid
  return packed.weight_from_fields(fmt, fields, meta)


def encode(params, where: str = "params") -> tuple[dict | object, dict]:
  """(arrays, spec): a nested dict of the arrays (str keys) and the JSON spec of the whole tree.

  Raises CheckpointError naming the path of a leaf that is neither an array nor a QuantizedWeight, or of a
  dict key that is not a plain string without '.' and '/' (Orbax joins keys with '.').
  """
  if isinstance(params, QuantizedWeight):
    arrays = {f: getattr(params, f) for f in params.ARRAY_FIELDS if getattr(params, f) is not None}
    return arrays, {"kind": "quantized", "meta": quantized_meta(params),
                    "arrays": {f: array_spec(a) for f, a in arrays.items()}}
  if _is_array(params):
    return params, dict(kind="array", **array_spec(params))
  if isinstance(params, dict):
    arrays, items = {}, {}
    for k, v in params.items():
      if not _key_ok(k):
        raise CheckpointError(f"{where}: key {k!r} cannot be stored; expected non-empty string keys without "
                              "'.' or '/'")
      arrays[k], items[k] = encode(v, f"{where}[{k!r}]")
    return arrays, {"kind": "dict", "items": items}
  if isinstance(params, (list, tuple)):
    pairs = [encode(v, f"{where}[{i}]") for i, v in enumerate(params)]
    return ({str(i): a for i, (a, _) in enumerate(pairs)},
            {"kind": type(params).__name__, "items": [s for _, s in pairs]})
  raise CheckpointError(f"{where} is a {type(params).__name__}; a checkpoint holds arrays and QuantizedWeight "
                        "leaves inside dicts and lists only")


def iter_specs(spec: dict, path: tuple = ()):
  """Yield (path, leaf spec) for every array / quantized leaf, path as a tuple of str keys."""
  kind = spec["kind"]
  if kind == "dict":
    for k, s in spec["items"].items():
      yield from iter_specs(s, path + (k,))
  elif kind in ("list", "tuple"):
    for i, s in enumerate(spec["items"]):
      yield from iter_specs(s, path + (str(i),))
  else:
    yield path, spec


def stored_arrays(spec: dict) -> dict[tuple, dict]:
  """{path of a stored array: {"shape", "dtype"}}; a quantized leaf contributes path + (field,)."""
  out = {}
  for path, s in iter_specs(spec):
    if s["kind"] == "quantized":
      out.update({path + (f,): a for f, a in s["arrays"].items()})
    else:
      out[path] = {"shape": s["shape"], "dtype": s["dtype"]}
  return out


def check_layout(spec: dict, where: str) -> None:
  """FormatError for a quantized leaf with an unreadable layout version or format (read from the spec only)."""
  for path, s in iter_specs(spec):
    if s["kind"] != "quantized":
      continue
    meta = s.get("meta", {})
    if meta.get("format") not in packed.FORMATS or not packed.layout_readable(
        meta.get("layout_version"), meta.get("format"), meta.get("bits", 3)):
      raise FormatError(f"{where}: packed weight {'.'.join(path)} has layout_version="
                        f"{meta.get('layout_version')!r} format={meta.get('format')!r}; this build reads layout "
                        f"version {packed.LAYOUT_VERSION} (and version 1 where the layouts agree) with formats "
                        f"{packed.FORMATS}. Re-export the checkpoint with this version of qdllm-jax.")


def _get(arrays, path, where):
  node = arrays
  for k in path:
    if not isinstance(node, dict) or k not in node:
      raise CheckpointError(f"{where}: array {'.'.join(path)} listed in the structure is missing from the stored "
                            "arrays; the checkpoint is incomplete, re-save it")
    node = node[k]
  return node


def _checked(a, want: dict, path, where):
  if list(a.shape) != list(want["shape"]) or jnp.dtype(a.dtype).name != want["dtype"]:
    raise CheckpointError(f"{where}: array {'.'.join(path)} is {tuple(a.shape)} {jnp.dtype(a.dtype).name}, the "
                          f"structure says {tuple(want['shape'])} {want['dtype']}; the checkpoint is corrupt")
  return a


def decode(spec: dict, arrays, where: str, path: tuple = ()):
  """Inverse of `encode`: the params pytree, every QuantizedWeight rebuilt and `validate()`d."""
  kind = spec["kind"]
  if kind == "dict":
    return {k: decode(s, arrays, where, path + (k,)) for k, s in spec["items"].items()}
  if kind in ("list", "tuple"):
    items = [decode(s, arrays, where, path + (str(i),)) for i, s in enumerate(spec["items"])]
    return items if kind == "list" else tuple(items)
  if kind == "array":
    return _checked(_get(arrays, path, where), spec, path, where)
  if kind == "quantized":
    fields = {f: _checked(_get(arrays, path + (f,), where), a, path + (f,), where) for f, a in spec["arrays"].items()}
    try:
      return weight_from_stored(fields, spec["meta"])
    except FormatError as e:
      raise FormatError(f"{where}: packed weight {'.'.join(path)}: {e}") from e
  raise CheckpointError(f"{where}: unknown node kind {kind!r} at {'.'.join(path) or '<root>'}")


def leaf_nbytes(s: dict) -> int:
  """Bytes of a spec leaf's arrays: prod(shape) * itemsize (summed over a quantized leaf's fields)."""
  arrs = s["arrays"].values() if s["kind"] == "quantized" else [s]
  return int(sum(math.prod(a["shape"]) * jnp.dtype(a["dtype"]).itemsize for a in arrs))


def leaf_params(s: dict) -> int:
  """Number of model parameters a spec leaf stands for (out * in for a packed weight)."""
  return int(math.prod(s["meta"]["shape"] if s["kind"] == "quantized" else s["shape"]))


def shardings(spec: dict, mesh, param_axes: Mapping[str, tuple], rules=sharding_lib.LOGICAL_RULES) -> dict:
  """NamedShardings for the stored arrays (nested like `encode`'s arrays).

  Dense leaves use `param_axes` (the family's `Family.param_axes`) of their name (the last dict key), as
  `sharding.param_shardings`.
  A packed weight's fields with an output-row axis (`ROW_AXIS`: planes, a_r, qweight, scales, zeros) are
  sharded over the mesh axis of the logical "rows" axis where it divides `out`; every other field, and
  every leaf of unknown name, is replicated.
  """
  def leaf(path, s):
    if s["kind"] == "quantized":
      out = {}
      for f, a in s["arrays"].items():
        axes = [None] * len(a["shape"])
        if ROW_AXIS.get(f) is not None:
          axes[ROW_AXIS[f]] = "rows"
        out[f] = sharding_lib.named(mesh, axes, a["shape"], rules)
      return out
    axes = param_axes.get(path[-1] if path else None)
    if axes is None or len(axes) != len(s["shape"]):
      axes = (None,) * len(s["shape"])
    return sharding_lib.named(mesh, axes, s["shape"], rules)

  def walk(s, path):
    if s["kind"] == "dict":
      return {k: walk(v, path + (k,)) for k, v in s["items"].items()}
    if s["kind"] in ("list", "tuple"):
      return {str(i): walk(v, path + (str(i),)) for i, v in enumerate(s["items"])}
    return leaf(path, s)
  return walk(spec, ())
