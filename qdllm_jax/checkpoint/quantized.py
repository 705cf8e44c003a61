"""Quantized model checkpoints: an Orbax array tree plus a JSON sidecar, written atomically.

Directory layout (`save_quantized`, version 2):
  arrays/<part>/        Orbax PyTree checkpoints of the stored arrays (dense leaves and the packed fields
                        planes/a_r/a_c/orders/plane_block or qweight/scales/zeros/g_idx), bit-exact, one part per
                        top-level param ("embed", "head", "final_norm") and one per block ("blocks.<i>"); each
                        part holds its subtree under its full path, so the parts merge into the params tree.
                        Writing and reading part by part bounds host memory by the largest part (Orbax keeps a
                        serialized copy of what it writes), and a block may be read from its spill only then.
  qdllm_checkpoint.json {"format", "version", "layout_version", "tree": structure spec (checkpoint/tree.py),
                         "metadata": the caller's run metadata, "tokenizer": {"files", "source"},
                         "digests": {part: {dotted array path: sha256}} (checkpoint/integrity.py)}
  checksums.json        size and sha256 of every other file (written last; `verify`, `load_quantized` check it)
  config.json           the model's HF config (`config_to_hf`)
  tokenizer files       copied from `tokenizer_from`, so the directory serves on its own

Sizes: for the packed linears Q and every stored array A,
  true bits per weight = 8 * sum_{w in Q} nbytes(w) / sum_{w in Q} out_w * in_w
  model bits per weight = 8 * sum_{a in A} nbytes(a) / (number of model parameters)
"""
from __future__ import annotations

import math
import os
import shutil

import jax
import jax.numpy as jnp

from qdllm_jax import fileio
from qdllm_jax import sharding as sharding_lib
from qdllm_jax.checkpoint import integrity, store, tree
from qdllm_jax.errors import CheckpointError
from qdllm_jax.models.families import config_from_hf, family_of, param_shapes
from qdllm_jax.models.hf_tokenizer import TOKENIZER_CORE, TOKENIZER_FILES
from qdllm_jax.models.model import Model
from qdllm_jax.models.model_config import ModelConfig, config_to_hf

SIDECAR = "qdllm_checkpoint.json"
CONFIG = "config.json"
FORMAT = "qdllm-jax.quantized"
VERSION = 2


def tokenizer_files(directory: str | None, what: str) -> list[str]:
  """The TOKENIZER_FILES present in `directory` (None -> []); CheckpointError if none of the core ones is."""
  if directory is None:
    return []
  if not os.path.isdir(directory):
    raise CheckpointError(f"{what}: tokenizer_from={directory!r} is not a directory; pass the original "
                          "checkpoint directory (or None)")
  files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, f))]
  if not any(f in files for f in TOKENIZER_CORE):
    raise CheckpointError(f"{what}: tokenizer_from={directory!r} holds none of {TOKENIZER_CORE}")
  return files


def check_structure(spec: dict, cfg: ModelConfig, where: str) -> None:
  """CheckpointError unless the tree has exactly the params of `cfg` with its shapes (packed weights by
  their logical [out, in] shape)."""
  shapes = param_shapes(cfg)
  want = {(k,): tuple(v) for k, v in shapes.items() if k != "blocks"}
  want.update({("blocks", str(i), k): tuple(v) for i, b in enumerate(shapes["blocks"]) for k, v in b.items()})
  have = {path: tuple(s["meta"]["shape"] if s["kind"] == "quantized" else s["shape"])
          for path, s in tree.iter_specs(spec)}
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    raise CheckpointError(f"{where}: params do not match {CONFIG}: missing {['.'.join(p) for p in missing[:4]]}, "
                          f"unexpected {['.'.join(p) for p in extra[:4]]}")
  for path, shp in want.items():
    if have[path] != shp:
      raise CheckpointError(f"{where}: {'.'.join(path)} has shape {have[path]}, expected {shp} from {CONFIG}")


def _is_lazy(x) -> bool:
  """A value read only when its part is written: `checkpoint.state.SpilledBlock` (a block on disk) or
  `models.hf_checkpoint.LazyTensor` (a tensor of the source checkpoint); both have load() and spec()."""
  return hasattr(x, "load") and hasattr(x, "spec")


def _parts(params: dict, where: str) -> list[tuple[str, tuple, object, dict]]:
  """[(part name, path prefix, value or lazy value, tree spec)] in write order (top-level params, then blocks)."""
  if not isinstance(params, dict) or not isinstance(params.get("blocks"), (list, tuple)):
    raise CheckpointError(f"{where}: params must be a dict with a 'blocks' list (the family's param_shapes layout)")
  out = []
  for k, v in params.items():
    items = enumerate(v) if k == "blocks" else [(None, v)]
    for i, x in items:
      name, prefix = (k, (k,)) if i is None else (f"blocks.{i}", ("blocks", str(i)))
      out.append((name, prefix, x, x.spec() if _is_lazy(x) else tree.encode(x, f"{where}.{name}")[1]))
  return out


def _full_spec(parts) -> dict:
  items = {p[0]: p[3] for p in parts if p[1][0] != "blocks"}
  items["blocks"] = {"kind": "list", "items": [p[3] for p in parts if p[1][0] == "blocks"]}
  return {"kind": "dict", "items": items}


def _under(prefix: tuple, value):
  """{prefix[0]: {prefix[1]: ... value}}: a part's arrays under their full path."""
  for k in reversed(prefix):
    value = {k: value}
  return value


def save_quantized(path: str, params: dict, config: ModelConfig, *, metadata: dict | None = None,
                   tokenizer_from: str | None = None, overwrite: bool = False) -> str:
  """Write a quantized model checkpoint directory atomically (layout in the module docstring).

  Args:
    path: target directory; written to a temporary sibling and renamed into place.
    params: the params pytree (the family's layout, `Family.param_shapes`) with dense arrays and QuantizedWeight leaves
      (e.g. `quantize_model(...)[0]`); arrays are stored bit-exactly in their own dtypes. A block may also be a
      `SpilledBlock` and a top-level param a `LazyTensor`: it is read only while its part is written, so the
      host holds one part at a time (the launch saves an 8B model this way).
    config: the model's ModelConfig (written as config.json).
    metadata: JSON-serializable run metadata (rules, report summary, fingerprint, ...).
    tokenizer_from: a directory whose tokenizer files are copied in (None: no tokenizer).
    overwrite: replace an existing `path` (atomically: the old one is deleted only after the swap).
  Returns:
    the absolute path. Raises CheckpointError (unwritable target, full disk, bad tree), FormatError (a
    packed weight that fails `validate()`) or ConfigError (metadata not JSON) before anything is written,
    or CheckpointError after cleaning up when a write fails.
  """
  where = "save_quantized"
  if not isinstance(config, ModelConfig):
    raise CheckpointError(f"{where}: config must be a ModelConfig, found {type(config).__name__}")
  for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, tree.QuantizedWeight) or _is_lazy(x)):
    if isinstance(leaf, tree.QuantizedWeight):
      leaf.validate()
  parts = _parts(params, where)
  spec = _full_spec(parts)
  check_structure(spec, config, where)
  tok = tokenizer_files(tokenizer_from, where)
  side = {"format": FORMAT, "version": VERSION, "layout_version": tree.packed.LAYOUT_VERSION, "tree": spec,
          "parts": [p[0] for p in parts], "metadata": metadata or {},
          "tokenizer": {"files": tok, "source": None if tokenizer_from is None else os.path.abspath(tokenizer_from)}}
  sidecar = store.to_json(side, f"{where} metadata")  # checked before any write; the digests are added below
  cfg_json = store.to_json(config_to_hf(config), CONFIG)
  n_arrays = len(tree.stored_arrays(spec))
  need = sum(tree.leaf_nbytes(s) for _, s in tree.iter_specs(spec)) + len(sidecar) + 200 * n_arrays + sum(
      os.path.getsize(os.path.join(tokenizer_from, f)) for f in tok)
  target = store.preflight(path, need, overwrite=overwrite, what=where)
  if tokenizer_from is not None and os.path.realpath(tokenizer_from) == os.path.realpath(target):
    raise CheckpointError(f"{where}: target {target} is the tokenizer_from directory; choose another target")
  digests = {}
  with fileio.atomic_dir(target, overwrite=overwrite, what=where) as tmp:
    for name, prefix, value, want in parts:
      arrays, got = tree.encode(value.load() if _is_lazy(value) else value, f"{where}.{name}")
      if got != want:
        raise CheckpointError(f"{where}: {name} read back with structure {got}, announced {want}; its source "
                              "changed during the save")
      nested = _under(prefix, arrays)
      digests[name] = integrity.tree_digests(nested)  # while the part is in memory: no second pass
      store.save_tree(os.path.join(tmp, store.ARRAYS_DIR, name), nested)
      del arrays, value, nested
    store.write_text(os.path.join(tmp, CONFIG), cfg_json)
    for f in tok:
      shutil.copy2(os.path.join(tokenizer_from, f), os.path.join(tmp, f))
    store.write_text(os.path.join(tmp, SIDECAR), store.to_json(dict(side, digests=digests), f"{where} metadata"))
    store.write_text(os.path.join(tmp, integrity.MANIFEST), store.to_json(integrity.manifest_json(tmp),
                                                                          integrity.MANIFEST))
  return target


def read_sidecar(path: str) -> tuple[dict, ModelConfig]:
  """(the sidecar dict, the ModelConfig) of a checkpoint directory, validated; no array is read.

  Raises CheckpointError for a missing/malformed directory and FormatError for an unknown layout version.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"quantized checkpoint {path!r} does not exist (or is not a directory); expected a "
                          f"directory written by save_quantized with {SIDECAR}")
  side = store.read_json(os.path.join(path, SIDECAR), "checkpoint sidecar")
  if side.get("format") != FORMAT or side.get("version") != VERSION or not isinstance(side.get("tree"), dict) \
      or not isinstance(side.get("parts"), list):
    raise CheckpointError(f"{os.path.join(path, SIDECAR)}: format {side.get('format')!r} version "
                          f"{side.get('version')!r}; expected {FORMAT!r} version {VERSION} with a 'tree' (a "
                          "checkpoint of another qdllm-jax version: re-save it with this one)")
  tree.check_layout(side["tree"], path)
  cfg = config_from_hf(store.read_json(os.path.join(path, CONFIG), "model config"), os.path.join(path, CONFIG))
  check_structure(side["tree"], cfg, path)
  return side, cfg


def _part_prefix(name: str) -> tuple:
  return tuple(name.split(".")) if name.startswith("blocks.") else (name,)


def _recorded_digests(side: dict, path: str) -> dict:
  digests = side.get("digests")
  if not isinstance(digests, dict) or sorted(digests) != sorted(side["parts"]):
    raise CheckpointError(f"{path}: {SIDECAR} records no array checksums for every part (saved by an older "
                          f"qdllm-jax); re-save it with this version; {integrity.SKIP_HINT}")
  return digests


def iter_parts(path: str, *, mesh=None, rules=sharding_lib.LOGICAL_RULES, verify: bool = False):
  """Yield (part name, its stored arrays nested under their full path) one part at a time: host numpy arrays,
  or sharded jax.Arrays on `mesh` (`tree.shardings`).

  verify=True first checks every file against checksums.json, then every array of a part against its sidecar
  digest while the part is in memory (arrays this process does not hold whole are covered by the file check).
  """
  side, cfg = read_sidecar(path)
  digests = None
  if verify:
    integrity.check_files(os.fspath(path), store.read_json)
    digests = _recorded_digests(side, path)
  else:
    integrity.check_sizes(os.fspath(path), store.read_json)
  stored = tree.stored_arrays(side["tree"])
  shard = None if mesh is None else tree.shardings(side["tree"], mesh, family_of(cfg).param_axes, rules)
  for name in side["parts"]:
    prefix = _part_prefix(name)
    specs = store.nest({p: a for p, a in stored.items() if p[:len(prefix)] == prefix})
    sub = None
    if shard is not None:
      sub = shard
      for k in prefix:
        sub = sub[k]
      sub = _under(prefix, sub)
    arrays = store.restore_tree(os.path.join(path, store.ARRAYS_DIR, name), specs, sub)
    if digests is not None:
      flat = integrity.flat_arrays(arrays)
      whole = {k: a for k, a in flat.items() if getattr(a, "is_fully_addressable", True)}
      want = {k: v for k, v in digests[name].items() if k in whole or k not in flat}
      integrity.check_digests({k: integrity.array_digest(a) for k, a in whole.items()}, want, path, name)
    yield name, arrays


def _merge(into: dict, new: dict) -> dict:
  for k, v in new.items():
    if isinstance(v, dict) and isinstance(into.get(k), dict):
      _merge(into[k], v)
    else:
      into[k] = v
  return into


def read_params(path: str, *, mesh=None, rules=sharding_lib.LOGICAL_RULES, host: bool = False, verify: bool = True):
  """(params, ModelConfig, sidecar) of a checkpoint directory; host=True gives numpy arrays (no device);
  verify: check the checksums (`iter_parts`)."""
  side, cfg = read_sidecar(path)
  arrays = {}
  for _, part in iter_parts(path, mesh=mesh, rules=rules, verify=verify):
    if mesh is None and not host:
      part = jax.tree.map(jnp.asarray, part)
    _merge(arrays, part)
  return tree.decode(side["tree"], arrays, os.fspath(path)), cfg, side


def load_quantized(path: str, *, mesh=None, rules=sharding_lib.LOGICAL_RULES, verify: bool = True) -> Model:
  """Restore a `save_quantized` directory as a Model whose packed linears are QuantizedWeight leaves.

  Args:
    path: the checkpoint directory.
    mesh: None (arrays on the default device) or a jax Mesh: dense leaves are sharded by
      the family's `param_axes`, packed fields along their output-row axis (logical "rows") where it divides,
      others replicated (`tree.shardings`); Orbax reads each array straight into its shards.
    rules: logical-axis rules (sharding.LOGICAL_RULES).
    verify: check every file against checksums.json and every array against its sidecar sha256 (one extra read
      of the files); a mismatch is a CheckpointError naming the file or array. False skips it (faster).
  Returns:
    Model(params, config); every packed weight has passed `validate()` (unknown layout -> FormatError,
    raised from the sidecar before any array is read).
  """
  params, cfg, _ = read_params(path, mesh=mesh, rules=rules, verify=verify)
  return Model(params=params, config=cfg)


def verify(path: str) -> dict:
  """Check a checkpoint without building a model: the sidecar and config, every file against checksums.json
  and every array (read part by part as host NumPy) against its sha256 in the sidecar.

  Returns {"files": n, "arrays": n, "bytes": n, "digests": {part: {array: sha256}}} (the digests verified);
  raises CheckpointError / FormatError naming what does not match.
  """
  side, _ = read_sidecar(path)
  n = 0
  for _, part in iter_parts(path, verify=True):  # checks the files first, then the arrays part by part
    n += len(integrity.flat_arrays(part))
  man = store.read_json(os.path.join(os.fspath(path), integrity.MANIFEST), "checksum manifest")
  return {"files": len(man["files"]), "arrays": n, "bytes": sum(r["size"] for r in man["files"].values()),
          "digests": side["digests"]}


def checkpoint_nbytes(path: str) -> int:
  """Bytes of the stored weight arrays, sum of prod(shape) * itemsize over every array Orbax recorded.

  (The logical array bytes; the files on disk may be smaller when the store compresses.) Raises
  CheckpointError when Orbax's record disagrees with the sidecar's structure.
  """
  side, _ = read_sidecar(path)
  want = {".".join(p): (tuple(a["shape"]), a["dtype"]) for p, a in tree.stored_arrays(side["tree"]).items()}
  have = {}
  for name in side["parts"]:
    have.update(store.tree_metadata(os.path.join(path, store.ARRAYS_DIR, name)))
  if have != want:
    diff = sorted(set(have.items()) ^ set(want.items()))[:4]
    raise CheckpointError(f"{path}: the stored arrays differ from {SIDECAR} (e.g. {diff}); the checkpoint is "
                          "corrupt, re-save it")
  return int(sum(jnp.dtype(dt).itemsize * math.prod(shape) for shape, dt in have.values()))


def size_summary(source) -> dict:
  """Model-level sizes of a quantized checkpoint directory (sidecar only) or a params pytree.

  Returns a dict:
    quantized_params  sum over packed linears of out * in
    quantized_bytes   sum of their stored bytes (every packed array: planes/codes, scales, zeros, orders, ...)
    true_bits_per_weight = 8 * quantized_bytes / quantized_params (nan without packed linears)
    dense_params, dense_bytes  the other leaves (embedding, head, norms, unquantized linears)
    total_params, total_bytes, model_bits_per_weight = 8 * total_bytes / total_params
  """
  spec = read_sidecar(source)[0]["tree"] if isinstance(source, (str, os.PathLike)) else _full_spec(
      _parts(source, "size_summary"))
  s = {"quantized_params": 0, "quantized_bytes": 0, "dense_params": 0, "dense_bytes": 0}
  for _, leaf in tree.iter_specs(spec):
    kind = "quantized" if leaf["kind"] == "quantized" else "dense"
    s[f"{kind}_params"] += tree.leaf_params(leaf)
    s[f"{kind}_bytes"] += tree.leaf_nbytes(leaf)
  s["total_params"] = s["quantized_params"] + s["dense_params"]
  s["total_bytes"] = s["quantized_bytes"] + s["dense_bytes"]
  q = s["quantized_params"]
  s["true_bits_per_weight"] = 8 * s["quantized_bytes"] / q if q else float("nan")
  s["model_bits_per_weight"] = 8 * s["total_bytes"] / max(s["total_params"], 1)
  return s
