"""Checksums of checkpoint directories: a sha256 per stored array (in the sidecar) and per file (`checksums.json`).

  array digest   sha256("<dtype>|<shape>|" + the array's C-order bytes), over the array exactly as stored
  checksums.json {"format": FORMAT, "algorithm": "sha256", "files": {relative path: {"size", "sha256"}}}: every
                 file of the directory written before it (Orbax data and metadata files, sidecar, config,
                 tokenizer), so a changed byte anywhere is found before Orbax parses anything

The array digests are computed while each part is in memory for writing (no second pass over the arrays) and
checked while each part is in memory after reading; the file digests cost one read of the written files.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from qdllm_jax.errors import CheckpointError

MANIFEST = "checksums.json"
FORMAT = "qdllm-jax.checksums"
_CHUNK = 1 << 22
SKIP_HINT = ("skip the check with verify=False (python API) or --no_verify (python -m qdllm_jax.generate / "
             "qdllm_jax.serve)")


def array_digest(a) -> str:
  """sha256 hex digest of an array's dtype, shape and C-order bytes (host NumPy or a fully addressable jax.Array)."""
  a = np.ascontiguousarray(np.asarray(a))
  h = hashlib.sha256(f"{a.dtype.name}|{tuple(int(s) for s in a.shape)}|".encode())
  h.update(a.reshape(-1).view(np.uint8).data if a.size else b"")
  return h.hexdigest()


def flat_arrays(nested, prefix: tuple = ()) -> dict[str, object]:
  """{dotted path: array} of a nested dict of arrays (the layout `tree.encode` / Orbax use)."""
  if isinstance(nested, dict):
    out = {}
    for k, v in nested.items():
      out.update(flat_arrays(v, prefix + (str(k),)))
    return out
  return {".".join(prefix): nested}


def tree_digests(nested, prefix: tuple = ()) -> dict[str, str]:
  """{dotted path: array_digest} of a nested dict of arrays."""
  return {k: array_digest(v) for k, v in flat_arrays(nested, prefix).items()}


def check_digests(got: dict[str, str], want: dict[str, str], where: str, what: str) -> None:
  """CheckpointError naming the first array whose digest differs from the recorded one (or is missing)."""
  for name in sorted(set(want) | set(got)):
    if got.get(name) != want.get(name):
      found = "missing" if name not in got else f"sha256 {got[name][:16]}..."
      expect = "no such array" if name not in want else f"sha256 {want[name][:16]}..."
      raise CheckpointError(f"{where}: {what} array {name} does not match its checksum ({found}, recorded "
                            f"{expect}); the stored bytes changed after the save (disk or copy corruption). "
                            f"Re-save the checkpoint (rerun the command that wrote it) or restore a good copy; "
                            f"{SKIP_HINT}")


def file_sha256(path: str) -> tuple[int, str]:
  """(size in bytes, sha256 hex) of a file, read in 4 MiB chunks."""
  h, n = hashlib.sha256(), 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      n += len(chunk)
  return n, h.hexdigest()


def _files(directory: str) -> list[str]:
  out = []
  for d, _, fs in os.walk(directory):
    out += [os.path.relpath(os.path.join(d, f), directory) for f in fs]
  return sorted(p for p in out if p != MANIFEST)


def manifest_json(directory: str) -> dict:
  """The checksums.json content for every file now in `directory`."""
  files = {}
  for rel in _files(directory):
    size, sha = file_sha256(os.path.join(directory, rel))
    files[rel] = {"size": size, "sha256": sha}
  return {"format": FORMAT, "algorithm": "sha256", "files": files}


def check_sizes(directory: str, read_json) -> None:
  """Without hashing: every file listed in checksums.json exists with its recorded size (no-op without the
  manifest). Run before Orbax reads anything even when the full check is skipped: a restore that fails inside
  TensorStore leaves read callbacks that fire on Orbax's closed event loop and flood stderr with "Event loop is
  closed" tracebacks, so missing or truncated files are refused here first."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    return
  for rel, rec in sorted(read_json(path, "checksum manifest").get("files", {}).items()):
    f = os.path.join(directory, rel)
    size = os.path.getsize(f) if os.path.isfile(f) else None
    if size != rec.get("size"):
      raise CheckpointError(f"{f}: {'missing' if size is None else f'{size} bytes'}, recorded {rec.get('size')} "
                            f"bytes in {MANIFEST}; the checkpoint is incomplete or damaged. Re-save it (rerun the "
                            "command that wrote it) or restore a good copy")


def check_files(directory: str, read_json) -> dict:
  """Check every file listed in `directory`/checksums.json (size, then sha256); returns the manifest.

  read_json(path, what) reads a JSON object (store.read_json). Raises CheckpointError naming the file (and the
  part of arrays/<part>/ it belongs to) for a missing manifest, a missing file or a changed one. Files not in
  the manifest are ignored (they are not part of the checkpoint).
  """
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory}: no {MANIFEST}; the checkpoint was saved by an older qdllm-jax (or copied "
                          f"without it), so its bytes cannot be checked. Re-save it with this version; "
                          f"{SKIP_HINT}")
  man = read_json(path, "checksum manifest")
  if man.get("format") != FORMAT or not isinstance(man.get("files"), dict):
    raise CheckpointError(f"{path}: format {man.get('format')!r}; expected {FORMAT!r} with a 'files' table (the "
                          f"file is damaged). Re-save the checkpoint; {SKIP_HINT}")
  for rel, rec in sorted(man["files"].items()):
    f = os.path.join(directory, rel)
    part = rel.split(os.sep)[1] if rel.startswith("arrays" + os.sep) and rel.count(os.sep) >= 2 else None
    where = f"{f}" + (f" (part {part})" if part else "")
    if not os.path.isfile(f):
      raise CheckpointError(f"{where}: missing; the checkpoint is incomplete. Re-save it or restore a good copy")
    size, sha = (os.path.getsize(f), None) if os.path.getsize(f) != rec.get("size") else file_sha256(f)
    if size != rec.get("size") or sha != rec.get("sha256"):
      raise CheckpointError(f"{where}: does not match its checksum in {MANIFEST} (size {size}, recorded "
                            f"{rec.get('size')}; the bytes changed after the save: disk or copy corruption). "
                            f"Re-save the checkpoint (rerun the command that wrote it) or restore a good copy; "
                            f"{SKIP_HINT}")
  return man
