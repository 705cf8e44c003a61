"""JSON sidecars and Orbax array trees of checkpoint directories (written inside `fileio.atomic_dir`).

`fileio.atomic_dir(target, ...)` yields a fresh temporary directory beside `target`; on success it is renamed into
place (an existing target, with overwrite=True, is moved aside first and deleted after the swap), on any
failure it is deleted. The target therefore either holds a complete checkpoint or is untouched; a kill -9
mid-write leaves only a hidden `.<name>.tmp-p<pid>@<host>-*` sibling, never a half-written `target`; the launch
removes such siblings once their writer is gone (`fileio.clean_stale`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import CheckpointError, ConfigError

ARRAYS_DIR = "arrays"


def to_json(value, what: str) -> str:
  """JSON text of `value` (numpy scalars/arrays become numbers/lists, tuples lists); ConfigError if impossible."""
  def default(o):
    if isinstance(o, np.generic):
      return o.item()
    if isinstance(o, (np.ndarray, jax.Array)):
      return np.asarray(o).tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")
  try:
    return json.dumps(value, indent=1, default=default)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{what} cannot be written as JSON ({e}); pass plain dicts/lists/str/numbers") from e


def write_text(path: str, text: str) -> None:
  """Write and fsync a text file."""
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def read_json(path: str, what: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except FileNotFoundError as e:
    raise CheckpointError(f"{path}: missing {what}; the directory is not a complete qdllm-jax checkpoint") from e
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read the {what} ({e}); expected a valid JSON file. The file is "
                          "truncated or damaged (an interrupted copy?): copy the directory again, re-run the "
                          "command that wrote it (a launch resumes and rewrites its checkpoint), or restore a good "
                          "copy") from e
  if not isinstance(d, dict):
    raise CheckpointError(f"{path}: the {what} is a JSON {type(d).__name__}, expected an object")
  return d


def preflight(target: str, need_bytes: int, *, overwrite: bool, what: str) -> str:
  """Absolute target path after checking, before any write: it does not exist (or overwrite), its parent
  is (or can be made) a writable directory, and the disk there has `need_bytes` free. Raises CheckpointError."""
  target = os.path.abspath(os.fspath(target))
  parent = os.path.dirname(target)
  if os.path.lexists(target) and (not overwrite or not os.path.isdir(target)):
    raise CheckpointError(f"{what}: {target} already exists; pass overwrite=True or choose a new directory")
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise CheckpointError(f"{what}: cannot create the parent directory {parent} ({e.strerror}); choose a "
                          "writable location") from e
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise CheckpointError(f"{what}: {parent} is not a writable directory; choose a writable location")
  free = shutil.disk_usage(parent).free
  if free < need_bytes:
    raise CheckpointError(f"{what}: {parent} has {free} bytes free, the checkpoint needs about {need_bytes}; free "
                          "disk space or choose another disk")
  return target


def _prune(tree):
  """Drop empty dicts (Orbax stores no empty subtrees); numpy scalars become 0-d arrays."""
  if isinstance(tree, dict):
    out = {k: _prune(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
  return np.asarray(tree) if isinstance(tree, np.generic) else tree


@contextlib.contextmanager
def _checkpointer(local: bool = False):
  """Yield (orbax module, PyTree checkpointer), closed on exit, also when the read or write fails (an unclosed
  checkpointer leaves its asyncio loop to be torn down later, which floods stderr with "Event loop is closed"
  on the next use of Orbax). local=True: a checkpointer of this process alone (no cross-process barriers): on
  multi-host runs one process writes host arrays while the others wait at our own barrier."""
  import orbax.checkpoint as ocp  # heavy import, only when arrays are written or read
  if local and jax.process_count() > 1:
    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=mp), multiprocessing_options=mp)
  else:
    ckptr = ocp.PyTreeCheckpointer()
  try:
    yield ocp, ckptr
  finally:
    ckptr.close()


def save_tree(path: str, arrays: dict) -> None:
  """Write a nested dict of arrays (host numpy, or jax arrays this process holds whole) as an Orbax PyTree
  checkpoint at `path` (synchronously: the files are complete when this returns), by this process alone.
  Orbax holds a serialized copy of every array while it writes, so callers bound memory by writing large trees
  in parts."""
  with _checkpointer(local=True) as (ocp, ckptr):
    ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(_prune(arrays)))


def save_arrays(directory: str, arrays: dict) -> None:
  """`save_tree` at `directory/arrays`."""
  save_tree(os.path.join(directory, ARRAYS_DIR), arrays)


def restore_tree(path: str, specs: dict, shardings: dict | None = None) -> dict:
  """Read the Orbax tree at `path`.

  specs: nested dict (as saved) of {"shape", "dtype"} leaves; shardings: the same nesting of NamedShardings
  (arrays come back as sharded jax.Arrays, each host reading its shards: on multi-host runs every process
  calls it) or None (host numpy arrays, read by this process alone).
  """
  path = os.path.abspath(path)  # Orbax requires absolute paths
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: missing Orbax arrays; the checkpoint is incomplete")
  with _checkpointer(local=shardings is None) as (ocp, ckptr):  # host reads are this process's own
    return _restore(ocp, ckptr, path, _prune(specs), shardings)


def _restore(ocp, ckptr, path: str, specs: dict, shardings: dict | None) -> dict:
  is_spec = lambda s: isinstance(s, dict) and "dtype" in s and "shape" in s  # noqa: E731
  if shardings is None:
    rargs = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray), specs, is_leaf=is_spec)
  else:
    rargs = jax.tree.map(lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=tuple(s["shape"]),
                                                            dtype=jnp.dtype(s["dtype"])),
                         specs, _prune(shardings), is_leaf=is_spec)
  try:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=rargs))
  except Exception as e:  # noqa: BLE001  (Orbax/TensorStore raise ValueError, KeyError, OSError or bare Exception)
    raise CheckpointError(f"{path}: cannot restore the arrays ({type(e).__name__}: {e}); the checkpoint is "
                          "incomplete or corrupt") from e


def restore_arrays(directory: str, specs: dict, shardings: dict | None = None) -> dict:
  """`restore_tree` of `directory/arrays`."""
  return restore_tree(os.path.join(directory, ARRAYS_DIR), specs, shardings)


def tree_metadata(path: str) -> dict:
  """{dotted name: (shape, dtype)} of the arrays of the Orbax tree at `path` as Orbax recorded them (no array
  data is read)."""
  with _checkpointer(local=True) as (_, ckptr):
    md = ckptr.metadata(os.path.abspath(path))
  md = getattr(md, "item_metadata", md)
  md = getattr(md, "tree", md)
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(
      md, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]:
    name = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in kp)
    out[name] = (tuple(int(s) for s in leaf.shape), jnp.dtype(leaf.dtype).name)
  return out


def nest(flat: dict[tuple, object]) -> dict:
  """{("a", "b"): v} -> {"a": {"b": v}}."""
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out
