"""Hugging Face checkpoint directories <-> `Model`: safetensors only, validated before any data is read.

A checkpoint directory holds `config.json` plus either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensor names are the exact HF names (models/hf.py) and linears stay `[out, in]`,
so loading and saving are pure renames and a round trip is bit-exact. Pickle checkpoints (`pytorch_model.bin`,
`*.pt`) are refused: unpickling runs arbitrary code.

  reader = open_checkpoint(path)           # config + every tensor's name/shape/dtype from the headers only
  for i, block in stream_blocks(path): ... # one block at a time, so an 8B model never sits in memory whole
  model = load_pretrained(path)            # everything
  save_pretrained(model, None, out_dir, max_shard_bytes=2**30, tokenizer_from=path)
"""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qdllm_jax import fileio
from qdllm_jax.errors import CheckpointError, ConfigError
from qdllm_jax.models import hf
from qdllm_jax.models.families import config_from_hf, family_of
from qdllm_jax.models.hf_tokenizer import TOKENIZER_CORE, TOKENIZER_FILES
from qdllm_jax.models.model import Model
from qdllm_jax.models.model_config import ModelConfig, config_to_hf

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_CONVERT_HINT = ("convert it once in a trusted environment with transformers: "
                 "`AutoModel.from_pretrained(src).save_pretrained(dst, safe_serialization=True)`")


def np_dtype(dtype) -> np.dtype | None:
  """None -> None; 'float32' / 'bfloat16' / 'float16' (or the numpy/jnp type) -> np.dtype."""
  try:
    dt = None if dtype is None else np.dtype(jnp.bfloat16 if dtype in ("bfloat16", "bf16") else dtype)
  except TypeError:
    dt = np.dtype("V1")  # not a dtype: reported below
  if dt is not None and dt.name not in _FLOAT_DTYPES.values():
    raise ConfigError(f"dtype={dtype!r} is not supported; expected None, 'float32', 'bfloat16' or 'float16'")
  return dt


def _canon(path: tuple) -> str:
  return path[0] if len(path) == 1 else f"blocks[{path[1]}].{path[2]}"


def _shape_of(shapes: dict, path: tuple) -> tuple:
  return shapes[path[0]] if len(path) == 1 else shapes["blocks"][path[1]][path[2]]


def _read_json(file: str, what: str) -> dict:
  try:
    with open(file, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file}: cannot read the {what} ({e}); expected a valid JSON file. The file is "
                          "truncated or damaged (an interrupted download or copy?): copy or download the model "
                          "directory again, or restore a good copy") from e
  if not isinstance(d, dict):
    raise CheckpointError(f"{file}: the {what} is a JSON {type(d).__name__}, expected an object")
  return d


def _weight_files(path: str) -> tuple[str, dict | None, list[str]]:
  """(the file that lists the weights, {HF name: shard} from the index or None, [shard file names])."""
  index_file, single = os.path.join(path, INDEX), os.path.join(path, WEIGHTS)
  files = sorted(os.listdir(path))
  if os.path.isfile(index_file):
    index = _read_json(index_file, "safetensors index")
    wmap = index.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
      raise CheckpointError(f"{index_file}: no 'weight_map' {{tensor name: shard file}}; re-save the checkpoint")
    shards = sorted(set(wmap.values()))
    for s in shards:
      if not isinstance(s, str) or os.path.basename(s) != s or not s.endswith(".safetensors"):
        raise CheckpointError(f"{index_file}: shard {s!r} is not a .safetensors file name in this directory")
      if not os.path.isfile(os.path.join(path, s)):
        missing = [n for n, f in wmap.items() if f == s]
        raise CheckpointError(f"{index_file}: lists shard {s!r} (holding {len(missing)} tensors, e.g. "
                              f"{missing[0]!r}) but {os.path.join(path, s)} does not exist; the download is "
                              "incomplete: fetch the missing shard")
    return index_file, wmap, shards
  if os.path.isfile(single):
    return single, None, [WEIGHTS]
  pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
  if pickles:
    raise CheckpointError(f"{path}: found only pickle weights {pickles}; pickle checkpoints are refused (loading "
                          f"them can run arbitrary code). Expected {WEIGHTS} or {INDEX}: {_CONVERT_HINT}")
  stray = [f for f in files if f.endswith(".safetensors")]
  raise CheckpointError(f"{path}: no weights file; expected {WEIGHTS} or {INDEX} with its shards" + (
      f" (found {stray} without the index: add it, or name a single file {WEIGHTS})" if stray else ""))


def _headers(path: str, shards: list[str]) -> dict[str, tuple[str, tuple, str]]:
  """{HF name: (shard, shape, safetensors dtype)} from the file headers only (no tensor data is read)."""
  out = {}
  for s in shards:
    file = os.path.join(path, s)
    try:
      with safe_open(file, framework="np") as f:
        for name in f.keys():
          sl = f.get_slice(name)
          if name in out:
            raise CheckpointError(f"{file}: tensor {name!r} is also stored in {out[name][0]}; keep one copy")
          out[name] = (s, tuple(sl.get_shape()), sl.get_dtype())
    except (SafetensorError, OSError) as e:
      raise CheckpointError(f"{file}: not a readable safetensors file ({e}); re-download or re-save it") from e
  return out


class LazyTensor:
  """One tensor of a CheckpointReader, read only by `load()` (host NumPy, cast to `dtype`); `spec()` gives its
  array spec from the header. `checkpoint.save_quantized` reads it only while writing its part."""

  def __init__(self, reader, name: str, dtype=None):
    self.reader, self.name, self.dtype = reader, name, dtype

  def spec(self) -> dict:
    _, shape, st = self.reader.tensors[self.name]
    dt = np_dtype(self.dtype)  # (a np.dtype is falsy: no `or`)
    dt = jnp.dtype(_FLOAT_DTYPES[st]) if dt is None else dt
    return {"kind": "array", "shape": [int(x) for x in shape], "dtype": jnp.dtype(dt).name}

  def load(self) -> np.ndarray:
    return self.reader.read(self.name, self.dtype, numpy=True)


class CheckpointReader:
  """A validated checkpoint directory. Tensors are read lazily (safetensors mmap), one request at a time.

  Attributes:
    path: the directory; config: its ModelConfig; names: {HF name: canonical path};
    tensors: {HF name: (shard file, shape, safetensors dtype)} from the headers.
  Array-returning methods take dtype (None keeps the stored dtype; else float32/bfloat16/float16) and
  numpy (True: host np.ndarray; False: jax.Array on the default device).
  """

  def __init__(self, path: str, config: ModelConfig, tensors: dict):
    self.path, self.config, self.tensors = path, config, tensors
    self.names = hf.all_names(config)

  def _read(self, hf_names: dict[str, str], dtype, numpy: bool) -> dict:
    dt = np_dtype(dtype)
    out, by_shard = {}, {}
    for key, name in hf_names.items():
      if name not in self.tensors:
        raise CheckpointError(f"{self.path}: no tensor {name!r}; it holds {len(self.tensors)}, e.g. "
                              f"{sorted(self.tensors)[:3]}")
      by_shard.setdefault(self.tensors[name][0], []).append((key, name))
    for shard, items in by_shard.items():
      with safe_open(os.path.join(self.path, shard), framework="np") as f:
        for key, name in items:
          a = np.asarray(f.get_tensor(name))
          a = a if dt is None or a.dtype == dt else a.astype(dt)
          out[key] = a if numpy else jnp.asarray(a)
    return out

  def read(self, name: str, dtype=None, numpy: bool = False):
    """The tensor stored under HF name `name`, shape as in the header (e.g. [out, in] for a linear)."""
    return self._read({name: name}, dtype, numpy)[name]

  def block(self, i: int, dtype=None, numpy: bool = False) -> dict:
    """Block i's params {canonical name: array} (the family's block layout), reading only its tensors."""
    if not 0 <= i < self.config.n_layers:
      raise CheckpointError(f"{self.path}: block {i} out of range; the model has {self.config.n_layers} blocks")
    return self._read(hf.block_names(self.config, i), dtype, numpy)

  def top(self, dtype=None, numpy: bool = False) -> dict:
    """The non-block params, e.g. {"embed": [V, D], "final_norm": [D], ("head": [V, D])} (family's top_names)."""
    return self._read(hf.top_names(self.config), dtype, numpy)

  def lazy_top(self, dtype=None) -> dict:
    """The non-block params as LazyTensors (nothing read until each one's `load()`)."""
    return {k: LazyTensor(self, name, dtype) for k, name in hf.top_names(self.config).items()}

  def load_params(self, dtype=None, numpy: bool = False) -> dict:
    """The whole params pytree (the family's layout, `Family.param_shapes`)."""
    params = self.top(dtype, numpy)
    params["blocks"] = [self.block(i, dtype, numpy) for i in range(self.config.n_layers)]
    return params


def open_checkpoint(path: str) -> CheckpointReader:
  """Validate a checkpoint directory from config.json and the safetensors headers, reading no tensor data.

  Checks, in order: the directory and config.json exist and parse (known model_type); the weights are
  safetensors (pickle refused); every shard the index lists exists; the index agrees with the shard headers;
  the tensor names are exactly `hf.all_names(cfg)` (none missing, none extra but the family's ignored
  non-parameters, e.g. BERT's pooler); every shape equals the family's `param_shapes(cfg)`; every dtype is
  F32/BF16/F16. The family's `refine` may adapt the config to the tensors (BERT: `bert.` prefix, MLM head).
  Raises CheckpointError naming file and tensor.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory {path!r} does not exist (or is not a directory); expected a "
                          f"local HF directory with {CONFIG} and {WEIGHTS} or {INDEX}")
  cfg_file = os.path.join(path, CONFIG)
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"{path}: no {CONFIG}; expected the model's HF config next to the weights")
  cfg = config_from_hf(_read_json(cfg_file, "model config"), cfg_file)
  listing, wmap, shards = _weight_files(path)
  tensors = _headers(path, shards)
  family = family_of(cfg)
  cfg = family.refine(cfg, set(tensors), path)
  if wmap is not None:
    for name, shard in wmap.items():
      if name not in tensors or tensors[name][0] != shard:
        where = f"found in {tensors[name][0]}" if name in tensors else "absent from the shards it lists"
        raise CheckpointError(f"{listing}: maps tensor {name!r} to {shard}, but it is {where}; fix the index")
    unlisted = sorted(set(tensors) - set(wmap))
    if unlisted:
      raise CheckpointError(f"{os.path.join(path, tensors[unlisted[0]][0])}: tensor {unlisted[0]!r} is not "
                            f"listed in {listing}; fix the index")
  expected, shapes = hf.all_names(cfg), family.param_shapes(cfg)
  for name, cpath in expected.items():
    if name not in tensors:
      raise CheckpointError(
          f"{listing}: tensor {name!r} (canonical {_canon(cpath)}, shape {_shape_of(shapes, cpath)}) is missing; "
          f"a {cfg.arch} checkpoint with this config.json has {len(expected)} tensors")
  for name, (shard, shape, dt) in tensors.items():
    file = os.path.join(path, shard)
    if name not in expected and family.ignored_tensor(name):
      continue
    if name not in expected:
      raise CheckpointError(f"{file}: unexpected tensor {name!r} (shape {shape}); a {cfg.arch} checkpoint with "
                            f"this config.json has exactly {len(expected)} tensors named as in models/hf.py")
    want = _shape_of(shapes, expected[name])
    if shape != want:
      raise CheckpointError(f"{file}: tensor {name!r} has shape {shape}, expected {want} from {CONFIG} "
                            f"({_canon(expected[name])}); the weights do not match the config")
    if dt not in _FLOAT_DTYPES:
      raise CheckpointError(f"{file}: tensor {name!r} has dtype {dt}, expected one of {sorted(_FLOAT_DTYPES)}")
  return CheckpointReader(path, cfg, tensors)


def load_pretrained(path: str, dtype=None) -> Model:
  """Load an HF directory of any registered family (config.json `model_type`) into a `Model` (params as jax
  arrays, [out, in] linears). See models/__init__.py for what the model returns.

  dtype: None keeps the stored dtype (bf16 for the released checkpoints); 'float32'/'bfloat16' casts all.
  """
  np_dtype(dtype)
  reader = open_checkpoint(path)
  return Model(params=reader.load_params(dtype), config=reader.config)


def stream_blocks(path, dtype=None, numpy: bool = False) -> Iterator[tuple[int, dict]]:
  """Yield (i, block i's params) for i = 0..n_layers-1, reading one block's tensors at a time.

  path: a directory or an open CheckpointReader (validated once, up front, before the first yield).
  """
  np_dtype(dtype)
  reader = path if isinstance(path, CheckpointReader) else open_checkpoint(path)
  return ((i, reader.block(i, dtype, numpy)) for i in range(reader.config.n_layers))


def load_top(path, dtype=None, numpy: bool = False) -> dict:
  """The non-block params only, e.g. {"embed": [V, D], "final_norm": [D], ("head": [V, D])} for LLaDA."""
  reader = path if isinstance(path, CheckpointReader) else open_checkpoint(path)
  return reader.top(dtype, numpy)


def _flat_params(params: dict, cfg: ModelConfig) -> list[tuple[str, object]]:
  """[(HF name, dense array)] in file order (embeddings, blocks, the other top params), validated against cfg."""
  family = family_of(cfg)
  shapes = family.param_shapes(cfg)
  if not isinstance(params, dict):
    raise CheckpointError(f"params must be a dict pytree (the family's layout), found {type(params).__name__}")
  extra, blocks = sorted(set(params) - set(shapes)), params.get("blocks")
  if extra or not isinstance(blocks, (list, tuple)) or len(blocks) != cfg.n_layers:
    raise CheckpointError(f"params do not match the config: unexpected keys {extra}, blocks {type(blocks).__name__}"
                          f" of length {len(blocks or ())}; expected keys {sorted(shapes)} and {cfg.n_layers} blocks")
  for i, b in enumerate(blocks):
    bad = sorted(set(b) ^ set(shapes["blocks"][i]))
    if bad:
      raise CheckpointError(f"params blocks[{i}]: keys {bad} missing or unexpected; expected "
                            f"{sorted(shapes['blocks'][i])}")
  top = hf.top_names(cfg)
  order = ([(top[k], (k,)) for k in family.embed_keys] + [(n, ("blocks", i, k)) for i in range(cfg.n_layers)
                                                          for k, n in hf.block_names(cfg, i).items()]
           + [(n, (k,)) for k, n in top.items() if k not in family.embed_keys])
  out = []
  for name, cpath in order:
    leaf = params[cpath[0]] if len(cpath) == 1 else params["blocks"][cpath[1]][cpath[2]]
    if not isinstance(leaf, (jax.Array, np.ndarray)):
      raise CheckpointError(f"params {_canon(cpath)} is a {type(leaf).__name__}, not a dense array; dequantize "
                            "packed weights before saving an HF checkpoint")
    if tuple(leaf.shape) != _shape_of(shapes, cpath) or np.dtype(leaf.dtype).name not in _FLOAT_DTYPES.values():
      raise CheckpointError(f"params {_canon(cpath)} ({name}): shape {tuple(leaf.shape)} dtype {leaf.dtype}, "
                            f"expected shape {_shape_of(shapes, cpath)} and a float dtype")
    out.append((name, leaf))
  return out


def _same_dir(a: str, b) -> bool:
  if b is None:
    return False
  b = b.path if isinstance(b, CheckpointReader) else os.fspath(b)
  return os.path.realpath(a) == os.path.realpath(b)


def save_pretrained(model_or_params, cfg: ModelConfig | None, path: str, max_shard_bytes: int | None = None, *,
                    tokenizer_from: str | None = None, overwrite: bool = False, source=None) -> str:
  """Write an HF checkpoint directory atomically: config.json + model.safetensors (or shards + index).

  Args:
    model_or_params: a Model (cfg may be None) or a params pytree in the family's layout (dense arrays).
    cfg: the ModelConfig parsed from config.json (its fields are written back unchanged).
    path: target directory. Written to a temporary sibling, then renamed into place.
    max_shard_bytes: shard when the total exceeds this (a tensor larger than it gets its own shard).
    tokenizer_from: copy the tokenizer files (TOKENIZER_FILES present there) from this directory.
    overwrite: replace an existing `path`; never allowed when `path` is `source` or `tokenizer_from`.
    source: the checkpoint (directory or CheckpointReader) the params were read from, which is never replaced.
  Returns:
    path. Tensor dtypes are kept; names are the exact HF names, so load_pretrained(path) is bit-exact.
  """
  params = model_or_params.params if isinstance(model_or_params, Model) else model_or_params
  if isinstance(model_or_params, Model):
    if cfg is not None and cfg != model_or_params.config:
      raise CheckpointError("save_pretrained: cfg differs from model.config; pass cfg=None with a Model")
    cfg = model_or_params.config
  if not isinstance(cfg, ModelConfig):
    raise CheckpointError(f"save_pretrained: cfg must be a ModelConfig, found {type(cfg).__name__}")
  hf_config = config_to_hf(cfg)
  flat = _flat_params(params, cfg)
  path = os.path.abspath(os.fspath(path))
  for other, what in ((source, "source checkpoint"), (tokenizer_from, "tokenizer_from directory")):
    if _same_dir(path, other):
      raise CheckpointError(f"save_pretrained: target {path} is the {what}; refusing to overwrite the "
                            "checkpoint being read, choose another directory")
  if os.path.lexists(path) and (not overwrite or not os.path.isdir(path)):
    raise CheckpointError(f"save_pretrained: {path} already exists; pass overwrite=True or choose a new directory")
  tok_files = []
  if tokenizer_from is not None:
    if not os.path.isdir(tokenizer_from):
      raise CheckpointError(f"tokenizer_from={tokenizer_from!r} is not a directory")
    tok_files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_from, f))]
    if not any(f in tok_files for f in TOKENIZER_CORE):
      raise CheckpointError(f"tokenizer_from={tokenizer_from!r} holds none of {TOKENIZER_CORE}")
  if max_shard_bytes is not None and max_shard_bytes <= 0:
    raise ConfigError(f"max_shard_bytes={max_shard_bytes}, expected a positive byte count or None")
  shards, size = [[]], 0
  for name, leaf in flat:
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, leaf))
    size += nbytes
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with fileio.atomic_dir(path, overwrite=True, what="save_pretrained") as tmp:
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
      json.dump(hf_config, f, indent=2)
    n, wmap, total = len(shards), {}, 0
    for k, shard in enumerate(shards):
      fname = WEIGHTS if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
      tensors = {name: np.ascontiguousarray(np.asarray(leaf)) for name, leaf in shard}
      save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
      wmap.update({name: fname for name in tensors})
      total += sum(a.nbytes for a in tensors.values())
    if n > 1:
      with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}, f, indent=2)
    for fname in tok_files:
      shutil.copy2(os.path.join(tokenizer_from, fname), os.path.join(tmp, fname))
  return path
