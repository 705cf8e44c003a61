"""The run's workdir: its fingerprint (what the outputs were made from) and a content digest of checkpoints.

The fingerprint hashes three components: the model (config.json, weight file names and sizes, every tensor's
name/shape/dtype from the safetensors headers), the calibration ids, and the semantic config (the keys of
config_schema.non_semantic_keys left out) with the resolved mesh, the package version and the JAX backend. `prepare`
records it in workdir/fingerprint.json and refuses a workdir that holds another run unless overwrite=True.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import jax
import numpy as np

import qdllm_jax
from qdllm_jax import checkpoint, fileio
from qdllm_jax import report as report_lib
from qdllm_jax.checkpoint import integrity, quantized
from qdllm_jax.errors import CheckpointError, ConfigError
from qdllm_jax.models import hf
from qdllm_jax.quant.block_source import ReaderSource

log = logging.getLogger("qdllm_jax.run")
OUTPUTS = ("fingerprint.json", "state", "checkpoint", "hf", "plots", "quant_report.json", "eval_fp.json",
           "report.json", "report.md", "run.log", "source_digests.json", "progress.json")


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
  """Create workdir and record the fingerprint; refuse another run's workdir unless overwrite. overwrite=True
  removes this package's outputs (OUTPUTS; nothing else) and the temporary directories of killed saves, whatever
  run they belong to, so the run starts over."""
  path = os.path.join(workdir, "fingerprint.json")
  if overwrite:
    clean_stale(workdir, force=True)
  old = None
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
  elif any(os.path.exists(os.path.join(workdir, o)) for o in ("state", "checkpoint")):
    old = {"fingerprint": "(unknown: no fingerprint.json)", "components": {}}
  if old is not None and old.get("fingerprint") != fp and not overwrite:
    changed = [k for k in ("model", "calibration", "config") if old.get("components", {}).get(k) != comps[k]]
    raise ConfigError(f"workdir {workdir} holds run {old.get('fingerprint')} but this run is {fp} (changed: "
                      f"{changed or 'unknown'}); use a new --workdir, or pass --overwrite to start over there")
  if old is not None and overwrite:  # also for the same fingerprint: e.g. the source weights changed in place
    log.warning("--overwrite: removing the outputs of run %s from %s", old.get("fingerprint"), workdir)
    for o in OUTPUTS:
      p = os.path.join(workdir, o)
      shutil.rmtree(p) if os.path.isdir(p) else (os.remove(p) if os.path.exists(p) else None)
  os.makedirs(workdir, exist_ok=True)
  report_lib.write_json(path, {"fingerprint": fp, "components": comps})


def content_digest(path: str) -> str:
  """sha256 over a quantized checkpoint's content, after `checkpoint.verify` (every file and array checked
  against its recorded sha256): the sorted (array path, array sha256) pairs, then the sidecar and config.json.
  Equal digests mean the same array contents, dtypes and shapes and the same sidecar (structure, metadata) and
  config, whatever the Orbax file names and timestamps. Reads one part (a block, the embedding, ...) at a time."""
  arrays = {k: v for part in quantized.verify(path)["digests"].values() for k, v in part.items()}
  h = hashlib.sha256()
  for name in sorted(arrays):
    h.update(f"{name}={arrays[name]}\n".encode())
  for name in (quantized.SIDECAR, quantized.CONFIG):
    with open(os.path.join(path, name), "rb") as f:
      h.update(f.read())
  return h.hexdigest()


def checkpoint_sizes(path: str) -> dict:
  """checkpoint.size_summary of a saved checkpoint plus checkpoint_nbytes (array bytes Orbax recorded),
  disk_bytes (files on disk) and checkpoint_sha256 (`content_digest`)."""
  disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
  return dict(checkpoint.size_summary(path), checkpoint_nbytes=checkpoint.checkpoint_nbytes(path), disk_bytes=disk,
              checkpoint_sha256=content_digest(path))


# ------------------------------------------------------------------------------------------ the source weights
SOURCE_DIGESTS = "source_digests.json"


class SourceDigests:
  """The sha256 of every source tensor this workdir's run read (`integrity.array_digest` of the stored array), kept
  in workdir/source_digests.json with the size and mtime of each weight file when its first tensor was digested.

  Tensors are digested as the run reads them anyway (blocks while they stream, the embedding for calibration, the
  head and norms while the checkpoint is saved), so an 8B run pays no extra pass. `check` refuses a tensor whose
  digest differs from the recorded one (the model changed under the workdir) and one with non-finite values,
  naming it; `recheck` (resume or finished workdir) re-reads only the weight files whose size or mtime changed.
  """

  def __init__(self, workdir: str, reader):
    self.path, self.reader = os.path.join(workdir, SOURCE_DIGESTS), reader
    old = {}
    if os.path.isfile(self.path):
      with open(self.path, encoding="utf-8") as f:
        old = json.load(f)
    self.tensors: dict[str, str] = dict(old.get("tensors", {}))
    self.files: dict[str, list] = dict(old.get("files", {}))
    self.recorded = bool(self.tensors)

  def _stat(self, shard: str) -> list:
    st = os.stat(os.path.join(self.reader.path, shard))
    return [st.st_size, st.st_mtime_ns]

  def check(self, name: str, a: np.ndarray) -> None:
    """Digest HF tensor `name` (as stored); CheckpointError if it is non-finite or differs from the record."""
    d = integrity.array_digest(a)
    old = self.tensors.get(name)
    bad = int(a.size - np.count_nonzero(np.isfinite(a))) if np.issubdtype(a.dtype, np.inexact) or \
        a.dtype.kind == "V" or "float" in a.dtype.name else 0
    file = os.path.join(self.reader.path, self.reader.tensors[name][0])
    if old is not None and old != d:
      raise CheckpointError(f"{file}: tensor {name} changed since this workdir's run read it (sha256 {d[:16]}..., "
                            f"recorded {old[:16]}...)" + (f" and holds {bad} non-finite value(s)" if bad else "") +
                            "; the outputs here were made from the old weights. Restore the model, or start "
                            "over with --overwrite (or a new --workdir)")
    if bad:
      raise CheckpointError(f"{file}: tensor {name} {tuple(a.shape)} has {bad} non-finite (NaN/Inf) value(s); "
                            "expected finite weights. Fix or re-download the checkpoint")
    self.tensors[name] = d
    self.files.setdefault(self.reader.tensors[name][0], self._stat(self.reader.tensors[name][0]))

  def save(self) -> None:
    report_lib.write_json(self.path, {"algorithm": "sha256 of dtype|shape|bytes (checkpoint/integrity.py)",
                                      "files": self.files, "tensors": dict(sorted(self.tensors.items()))})

  def recheck(self) -> str:
    """Re-read the recorded tensors of every weight file whose size or mtime changed since it was digested
    (CheckpointError naming a tensor whose content changed); returns a sentence saying what was checked."""
    if not self.recorded:
      return "no source digests recorded in this workdir (older run): the weight files' names, sizes and headers " \
             "were checked (fingerprint), not their contents"
    changed = sorted(s for s, rec in self.files.items() if self._stat(s) != rec)
    names = [n for n in self.tensors if self.reader.tensors.get(n, ("",))[0] in changed]
    for n in names:
      self.check(n, self.reader.read(n, None, numpy=True))
    for s in changed:
      self.files[s] = self._stat(s)
    if changed:
      self.save()
      return (f"{len(changed)} weight file(s) changed size or mtime ({changed[:3]}): re-read their {len(names)} "
              "recorded tensors, contents unchanged")
    return (f"weight files unchanged in size and mtime since their {len(self.tensors)} tensors were digested "
            "(contents not re-read)")

  def summary(self) -> str:
    """sha256 over the sorted (name, digest) pairs: one digest of every tensor the run read."""
    return _sha(sorted(self.tensors.items()))


def checked_source(reader, dtype, digests: SourceDigests):
  """`block_source.ReaderSource(reader, dtype)` whose every tensor read is digested and checked by `digests` (the
  stored array is digested, then cast to `dtype`)."""

  def cast(a):
    return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(np.dtype(dtype))

  def read(names: dict) -> dict:
    out = {}
    for k, n in names.items():
      a = reader.read(n, None, numpy=True)
      digests.check(n, a)
      out[k] = cast(a)
    return out

  class _Lazy:
    def __init__(self, lazy):
      self.lazy = lazy

    def spec(self):
      return self.lazy.spec()

    def load(self):
      return read({0: self.lazy.name})[0]

  class CheckedSource(ReaderSource):
    def block(self, i):
      return read(hf.block_names(self.config, i))

    def top(self):
      return read(hf.top_names(self.config))

    def embedding(self):
      return read({0: hf.top_names(self.config)["embed"]})[0]

    def lazy_top(self):
      return {k: _Lazy(v) for k, v in reader.lazy_top(dtype).items()}

  return CheckedSource(reader, dtype)


def clean_stale(workdir: str, *, force: bool = False) -> list[str]:
  """Remove the temporary directories that killed writers left in the workdir, its state and blocks
  (`fileio.clean_stale`: only those whose owner process is gone, or all with force=True)."""
  removed = []
  for d in (workdir, os.path.join(workdir, "state"), os.path.join(workdir, "state", "blocks")):
    removed += fileio.clean_stale(d, force=force)
  for p in removed:
    log.info("removed %s (left by a killed save)", p)
  return removed


# ------------------------------------------------------------------------------------------ progress over attempts
PROGRESS = "progress.json"


class Progress:
  """Every attempt of the run in this workdir (started, resumed from which block, its step timings) and the wall
  time of every quantized block, in workdir/progress.json, so that a resumed run's report is complete.

  Written after each block and each step (atomically); a kill loses at most the step in progress. Only the
  writer (process 0 of a multi-host run) writes; the other processes keep their copy in memory.
  """

  def __init__(self, workdir: str, writer: bool = True):
    self.path, self.writer = os.path.join(workdir, PROGRESS), writer
    d = {}
    if os.path.isfile(self.path):
      with open(self.path, encoding="utf-8") as f:
        d = json.load(f)
    self.runs, self.block_s = list(d.get("runs", [])), {int(k): v for k, v in d.get("block_s", {}).items()}
    self.current = None

  def start(self, resumed_from: int | None, skipped: bool, timings: dict) -> None:
    self.current = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "resumed_from_block": resumed_from,
                    "skipped_quantization": skipped, "timings_s": timings}
    self.runs.append(self.current)
    self.save()

  def block(self, b: int, seconds: float) -> None:
    self.block_s[b] = float(seconds)
    self.save()

  def save(self) -> None:
    if not self.writer:
      return
    blocks = {str(k): v for k, v in sorted(self.block_s.items())}
    report_lib.write_json(self.path, {"runs": self.runs, "block_s": blocks})

  def summary(self) -> dict:
    """{"resumed", "resumed_from_block", "reused_checkpoint", "attempts", "runs", "block_s" (wall seconds per
    block), "timings_s"}: timings_s sums every step over the attempts, quantize being the sum of the block times
    (an attempt killed mid-step still contributes its finished blocks)."""
    total: dict = {}
    for r in self.runs:
      for k, v in r["timings_s"].items():
        total[k] = total.get(k, 0.0) + v
    if self.block_s:
      total["quantize"] = float(sum(self.block_s.values()))
    cur = self.current or {}
    return {"resumed": cur.get("resumed_from_block") is not None, "resumed_from_block": cur.get("resumed_from_block"),
            "reused_checkpoint": bool(cur.get("skipped_quantization")), "attempts": len(self.runs),
            "runs": self.runs, "block_s": [self.block_s[k] for k in sorted(self.block_s)], "timings_s": total}
