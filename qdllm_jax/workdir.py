"""The run's workdir: its fingerprint (what the outputs were made from) and a content digest of checkpoints.

The fingerprint hashes three components: the model (config.json, weight file names and sizes, every tensor's
name/shape/dtype from the safetensors headers), the calibration ids, and the semantic config (config.py
NON_SEMANTIC keys left out) with the resolved mesh, the package version and the JAX backend. `prepare`
records it in workdir/fingerprint.json and refuses a workdir that holds another run unless overwrite=True.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import jax
import numpy as np

import qdllm_jax
from qdllm_jax import report as report_lib
from qdllm_jax.errors import ConfigError

log = logging.getLogger("qdllm_jax.run")
OUTPUTS = ("fingerprint.json", "state", "checkpoint", "hf", "plots", "quant_report.json", "eval_fp.json",
           "report.json", "report.md", "run.log")


def _sha(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(reader) -> str:
  """Digest of a checkpoint from config.json, its weight files' names and sizes and the tensor headers (no
  tensor data is read)."""
  files = sorted({s for s, _, _ in reader.tensors.values()})
  return _sha({"config": dict(sorted(reader.config.raw_dict().items())),
               "files": [(f, os.path.getsize(os.path.join(reader.path, f))) for f in files],
               "tensors": sorted((n, list(s), d) for n, (_, s, d) in reader.tensors.items())})


def fingerprint(spec, reader, ids: np.ndarray, mesh_axes: dict) -> tuple[str, dict]:
  """(hex digest, components): model identity, calibration ids and the semantic config (module docstring)."""
  calib = hashlib.sha256(np.ascontiguousarray(ids).tobytes() + str(ids.shape).encode()).hexdigest()
  conf = {"config": spec.semantic_dict(), "mesh": mesh_axes, "version": qdllm_jax.__version__,
          "backend": jax.default_backend()}
  comps = {"model": model_identity(reader), "calibration": calib, "config": _sha(conf)}
  return _sha(comps)[:32], dict(comps, config_values=conf)


def prepare(workdir: str, fp: str, comps: dict, overwrite: bool) -> None:
  """Create workdir and record the fingerprint; refuse another run's workdir unless overwrite (then only
  this package's outputs, OUTPUTS, are removed)."""
  path = os.path.join(workdir, "fingerprint.json")
  old = None
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
  elif any(os.path.exists(os.path.join(workdir, o)) for o in ("state", "checkpoint")):
    old = {"fingerprint": "(unknown: no fingerprint.json)", "components": {}}
  if old is not None and old.get("fingerprint") != fp:
    changed = [k for k in ("model", "calibration", "config") if old.get("components", {}).get(k) != comps[k]]
    if not overwrite:
      raise ConfigError(f"workdir {workdir} holds run {old.get('fingerprint')} but this run is {fp} (changed: "
                        f"{changed or 'unknown'}); use a new --workdir, or pass --overwrite to start over there")
    log.warning("--overwrite: removing the outputs of run %s from %s", old.get("fingerprint"), workdir)
    for o in OUTPUTS:
      p = os.path.join(workdir, o)
      shutil.rmtree(p) if os.path.isdir(p) else (os.remove(p) if os.path.exists(p) else None)
  os.makedirs(workdir, exist_ok=True)
  report_lib.write_json(path, {"fingerprint": fp, "components": comps})


def content_digest(path: str) -> str:
  """sha256 over a quantized checkpoint's content: the sha256 of every stored array (path, dtype, shape, bytes),
  in sorted path order, then the sidecar and config.json. Equal digests mean bit-identical checkpoints (file
  timestamps aside). Reads one part (a block, the embedding, ...) at a time."""
  from qdllm_jax.checkpoint import quantized
  leaves = {}
  for _, part in quantized.iter_parts(path):
    for kp, leaf in jax.tree_util.tree_flatten_with_path(part)[0]:
      a = np.ascontiguousarray(np.asarray(leaf))
      name = jax.tree_util.keystr(kp)
      leaves[name] = hashlib.sha256(f"{name}|{a.dtype}|{a.shape}|".encode() + a.tobytes()).hexdigest()
  h = hashlib.sha256()
  for name in sorted(leaves):
    h.update(f"{name}={leaves[name]}\n".encode())
  for name in (quantized.SIDECAR, quantized.CONFIG):
    with open(os.path.join(path, name), "rb") as f:
      h.update(f.read())
  return h.hexdigest()


def checkpoint_sizes(path: str) -> dict:
  """checkpoint.size_summary of a saved checkpoint plus checkpoint_nbytes (array bytes Orbax recorded),
  disk_bytes (files on disk) and checkpoint_sha256 (`content_digest`)."""
  from qdllm_jax import checkpoint
  disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
  return dict(checkpoint.size_summary(path), checkpoint_nbytes=checkpoint.checkpoint_nbytes(path), disk_bytes=disk,
              checkpoint_sha256=content_digest(path))
