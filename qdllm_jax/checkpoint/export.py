"""Exports of a quantized checkpoint: dense HF safetensors (fake-quantized) and packed safetensors.

`export_hf`: every packed weight dequantized, W^ = QuantizedWeight.dequantize() cast to `dtype`, written by
`save_pretrained` (config.json + model.safetensors with the exact HF names, tokenizer copied), so
`load_pretrained`, the original PyTorch model code and `safetensors.torch` read it.

`export_packed_safetensors`: `model.safetensors` holding the dense leaves under their HF names and every
packed field under `<HF tensor name>.<field>`, e.g. `model.transformer.blocks.0.q_proj.weight.planes`
(fields and layout in docs/packed_format.md, `quant/packed.py`). The header metadata key "qdllm_quantization"
is a JSON string {"layout_version", "spec", "weights": {HF name: static metadata + "fields"}}; the same
document, plus the run metadata, is written as `quantization_config.json`. `load_packed_safetensors` reads it.
Sources are only read; an out_dir equal to (or inside) the source is refused.
"""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qdllm_jax import fileio
from qdllm_jax.checkpoint import quantized, store, tree
from qdllm_jax.errors import CheckpointError, FormatError
from qdllm_jax.models import hf
from qdllm_jax.models.families import config_from_hf
from qdllm_jax.models.hf_checkpoint import np_dtype, save_pretrained
from qdllm_jax.models.model import Model
from qdllm_jax.models.model_config import ModelConfig, config_to_hf

PACKED_WEIGHTS = "model.safetensors"
QUANT_CONFIG = "quantization_config.json"
HEADER_KEY = "qdllm_quantization"
SPEC = "qdllm-jax packed format (docs/packed_format.md; qdllm_jax/quant/packed.py)"


def _refuse_source(path_q: str, out_dir: str, what: str) -> str:
  src, out = os.path.realpath(path_q), os.path.realpath(out_dir)
  if out == src or os.path.commonpath([src, out]) == src:
    raise CheckpointError(f"{what}: out_dir {out_dir!r} is (inside) the source checkpoint {path_q!r}; sources are "
                          "never modified, choose a directory outside it")
  return os.path.abspath(out_dir)


def _hf_names(cfg: ModelConfig) -> dict[tuple, str]:
  """{spec path (("embed",) or ("blocks", "3", "q")): HF tensor name}."""
  return {tuple(str(p) for p in cpath): name for name, cpath in hf.all_names(cfg).items()}


def export_hf(path_q: str, out_dir: str, dtype: str | None = "bfloat16", *, max_shard_bytes: int | None = None,
              overwrite: bool = False) -> str:
  """Write the dequantized model as an HF safetensors directory (see module docstring).

  Args:
    path_q: a `save_quantized` directory (only read).
    out_dir: the new directory (atomic write by `save_pretrained`).
    dtype: "bfloat16" / "float16" / "float32" for every tensor (config.json's torch_dtype is set to it), or
      None: packed weights in float32, dense leaves in their stored dtype.
    max_shard_bytes: shard the safetensors above this size (None: one file).
  Returns:
    out_dir (absolute). Tensor o of a packed linear equals dequantize()[o] cast to dtype, bit for bit.
  """
  what = "export_hf"
  dt = np_dtype(dtype)
  out = _refuse_source(path_q, out_dir, what)
  params, cfg, side = quantized.read_params(path_q, host=True)

  def dense(leaf):
    if isinstance(leaf, tree.QuantizedWeight):
      return np.asarray(leaf.dequantize(jnp.float32)).astype(np.float32 if dt is None else dt)
    return leaf if dt is None else np.asarray(leaf).astype(dt)
  params = {k: [{n: dense(v) for n, v in b.items()} for b in v] if k == "blocks" else dense(v)
            for k, v in params.items()}
  if dt is not None:
    cfg = config_from_hf(dict(config_to_hf(cfg), torch_dtype=dt.name))
  tok = path_q if side["tokenizer"]["files"] else None
  return save_pretrained(params, cfg, out, max_shard_bytes, tokenizer_from=tok, overwrite=overwrite, source=path_q)


def export_packed_safetensors(path_q: str, out_dir: str, *, overwrite: bool = False) -> str:
  """Write the packed arrays as safetensors with the layout in the header (see module docstring).

  Args:
    path_q: a `save_quantized` directory (only read).
    out_dir: the new directory: model.safetensors, quantization_config.json, config.json, tokenizer files.
  Returns:
    out_dir (absolute); `load_packed_safetensors(out_dir)` restores the params bit-exactly.
  """
  what = "export_packed_safetensors"
  out = _refuse_source(path_q, out_dir, what)
  params, cfg, side = quantized.read_params(path_q, host=True)
  names = _hf_names(cfg)
  tensors, weights = {}, {}
  arrays, spec = tree.encode(params)
  for path, s in tree.iter_specs(spec):
    name, node = names[path], arrays
    for k in path:
      node = node[k]
    if s["kind"] == "quantized":
      weights[name] = dict(s["meta"], fields=sorted(node))
      tensors.update({f"{name}.{f}": np.ascontiguousarray(np.asarray(a)) for f, a in node.items()})
    else:
      tensors[name] = np.ascontiguousarray(np.asarray(node))
  doc = {"layout_version": tree.packed.LAYOUT_VERSION, "spec": SPEC, "weights": weights}
  header = json.dumps(doc, sort_keys=True)
  qconfig = store.to_json(dict(doc, quant_method="qdllm", dense=sorted(set(names.values()) - set(weights)),
                               metadata=side.get("metadata", {})), QUANT_CONFIG)
  tok = side["tokenizer"]["files"]
  need = sum(a.nbytes for a in tensors.values()) + len(header) + len(qconfig)
  target = store.preflight(out, need, overwrite=overwrite, what=what)
  with fileio.atomic_dir(target, overwrite=overwrite, what=what) as tmp:
    save_file(tensors, os.path.join(tmp, PACKED_WEIGHTS), metadata={"format": "qdllm-packed", HEADER_KEY: header})
    store.write_text(os.path.join(tmp, QUANT_CONFIG), qconfig)
    store.write_text(os.path.join(tmp, quantized.CONFIG), store.to_json(config_to_hf(cfg), quantized.CONFIG))
    for f in tok:
      shutil.copy2(os.path.join(path_q, f), os.path.join(tmp, f))
  return target


def load_packed_safetensors(path: str) -> Model:
  """Restore an `export_packed_safetensors` directory as a Model with QuantizedWeight leaves.

  Checks, before reading tensor data: config.json parses; the header names layout version
  `packed.LAYOUT_VERSION` (else FormatError); the tensor names are exactly the config's HF names, packed
  ones expanded to `<name>.<field>`. Every packed weight passes `validate()`.
  """
  path = os.fspath(path)
  file = os.path.join(path, PACKED_WEIGHTS)
  if not os.path.isfile(file):
    raise CheckpointError(f"{path}: no {PACKED_WEIGHTS}; expected a directory written by export_packed_safetensors")
  cfg_file = os.path.join(path, quantized.CONFIG)
  cfg = config_from_hf(store.read_json(cfg_file, "model config"), cfg_file)
  try:
    with safe_open(file, framework="np") as f:
      header, keys = f.metadata() or {}, set(f.keys())
      if HEADER_KEY not in header:
        raise CheckpointError(f"{file}: no {HEADER_KEY!r} entry in the safetensors metadata; it is not a packed "
                              "qdllm-jax export (a dense HF checkpoint loads with load_pretrained)")
      try:
        doc = json.loads(header[HEADER_KEY])
        weights = doc["weights"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: malformed {HEADER_KEY!r} metadata ({e})") from e
      if doc.get("layout_version") not in (1, tree.packed.LAYOUT_VERSION):  # per weight: QuantizedWeight.validate
        raise FormatError(f"{file}: packed layout_version={doc.get('layout_version')!r}; this build reads version "
                          f"{tree.packed.LAYOUT_VERSION}. Re-export with this version of qdllm-jax.")
      names = {name: path_ for path_, name in _hf_names(cfg).items()}
      want = set()
      for name in names:
        want |= {f"{name}.{fld}" for fld in weights[name]["fields"]} if name in weights else {name}
      if keys != want or set(weights) - set(names):
        bad = sorted(keys ^ want)[:4] or sorted(set(weights) - set(names))[:4]
        raise CheckpointError(f"{file}: tensor names do not match {quantized.CONFIG} (e.g. {bad}); expected the "
                              "config's HF names with packed weights as <name>.<field>")
      flat = {}
      for name, p in names.items():
        if name in weights:
          meta = {k: v for k, v in weights[name].items() if k != "fields"}
          fields = {fld: jnp.asarray(f.get_tensor(f"{name}.{fld}")) for fld in weights[name]["fields"]}
          flat[p] = tree.weight_from_stored(fields, meta)
        else:
          flat[p] = jnp.asarray(f.get_tensor(name))
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{file}: not a readable safetensors file ({e}); re-export it") from e
  except TypeError as e:
    raise FormatError(f"{file}: a packed weight has unknown fields ({e}); re-export with this version") from e
  params = {p[0]: v for p, v in flat.items() if len(p) == 1}
  params["blocks"] = [{p[2]: v for p, v in flat.items() if len(p) == 3 and p[1] == str(i)}
                      for i in range(cfg.n_layers)]
  quantized.check_structure(tree.encode(params)[1], cfg, file)
  return Model(params=params, config=cfg)
