"""Resumable quantization: the `PipelineState` after each block, saved atomically and restored bit-exactly.

    fp = run_fingerprint(...)                                  # any string naming the run's inputs
    state = load_state(dir, fp)                                # None on a fresh start
    quantize_model(src, ids, plan, resume=state, hooks=BlockHooks(on_block=spilling_hook(dir, fp)))

Layout (version 2):
  dir/blocks/block-<i:06d>/   one finished block, written once: `arrays/` (Orbax: its params with the packed
                              fields) and `block.json` (fingerprint, index, structure spec, the sha256 of every
                              array, checked when the block is read back)
  dir/state-<next_block:06d>/ `arrays/` (Orbax: the propagated activations x [N, L, D], the global-ABMP
                              orders) and `state.json` (fingerprint, next_block, report so far, global_bits)
A save writes only the blocks not on disk yet, so the bytes written over a run are the model's once (not
once per block), and a run may drop its finished blocks from memory (`SpilledBlock`, `spill`): the host then
holds one block and the activations, whatever the depth. Every directory is written to a temporary sibling
and renamed into place; an older state is deleted only after the newer one's rename. A kill -9 at any point
therefore leaves the newest complete state (the previous one, or the new one) loadable, with all its blocks;
stale temporary directories are removed by the next `save_state`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil

import numpy as np

from qdllm_jax import fileio
from qdllm_jax.checkpoint import integrity, store, tree
from qdllm_jax.errors import CheckpointError, ConfigError
from qdllm_jax.quant.pipeline import PipelineState

STATE_JSON = "state.json"
BLOCK_JSON = "block.json"
BLOCKS_DIR = "blocks"
FORMAT = "qdllm-jax.pipeline_state"
VERSION = 2
_NAME = re.compile(r"^state-(\d{6})$")


@dataclasses.dataclass(frozen=True)
class SpilledBlock:
  """A finished block that lives on disk (`dir/blocks/block-<index>`), not in memory; `load()` reads it back
  as the params dict (host NumPy arrays, QuantizedWeight leaves) after checking the run's fingerprint."""
  path: str
  index: int
  fingerprint: str

  def _meta(self) -> dict:
    meta = store.read_json(os.path.join(self.path, BLOCK_JSON), "spilled block")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION or meta.get("index") != self.index:
      raise CheckpointError(f"{self.path}: not block {self.index} of a version-{VERSION} pipeline state "
                            f"(found {meta.get('format')!r} v{meta.get('version')!r} index {meta.get('index')!r})")
    if meta.get("fingerprint") != self.fingerprint:
      raise ConfigError(f"{self.path}: block written by run {meta.get('fingerprint')!r}, expected "
                        f"{self.fingerprint!r}; delete the state directory to start over")
    tree.check_layout(meta["spec"], self.path)
    return meta

  def spec(self) -> dict:
    """The block's structure spec (checkpoint/tree.py), from its block.json alone."""
    return self._meta()["spec"]

  def load(self) -> dict:
    meta = self._meta()
    spec = meta["spec"]
    arrays = store.restore_arrays(self.path, store.nest(tree.stored_arrays(spec)))
    if "digests" in meta:  # written by save_state since the checksums exist: a changed byte is not carried on
      integrity.check_digests(integrity.tree_digests(arrays), meta["digests"], self.path, f"spilled block {self.index}")
    return tree.decode(spec, arrays, self.path, ())


def load_block(block) -> dict:
  """A finished block's params dict, from memory or from its spill."""
  return block.load() if isinstance(block, SpilledBlock) else block


def _states(directory: str) -> list[tuple[int, str]]:
  """[(next_block, path)] of the complete state directories, ascending."""
  if not os.path.isdir(directory):
    return []
  found = [(int(m.group(1)), os.path.join(directory, n)) for n in os.listdir(directory) if (m := _NAME.match(n))]
  return sorted(found)


def _block_dir(directory: str, i: int) -> str:
  return os.path.join(os.path.abspath(os.fspath(directory)), BLOCKS_DIR, f"block-{i:06d}")


def _check_fingerprint(fingerprint) -> str:
  if not isinstance(fingerprint, str) or not fingerprint:
    raise ConfigError(f"fingerprint={fingerprint!r}; expected a non-empty string identifying the run (model, "
                      "calibration data, rules)")
  return fingerprint


def _clean_tmp(directory: str) -> None:
  """Remove temporary directories left by a killed writer (one writer per directory)."""
  for d in (directory, os.path.join(directory, BLOCKS_DIR)):
    for n in os.listdir(d) if os.path.isdir(d) else ():
      if n.startswith((".state-", ".block-")) and ".tmp-" in n:
        shutil.rmtree(os.path.join(d, n), ignore_errors=True)


def _write_block(directory: str, i: int, block: dict, fingerprint: str) -> None:
  arrays, spec = tree.encode(block, f"state.blocks[{i}]")
  meta = store.to_json({"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "index": i,
                        "spec": spec, "digests": integrity.tree_digests(arrays)}, f"save_state: block {i}")
  need = sum(tree.leaf_nbytes(s) for _, s in tree.iter_specs(spec)) + len(meta)
  target = store.preflight(_block_dir(directory, i), need, overwrite=True, what="save_state")
  with fileio.atomic_dir(target, overwrite=True, what="save_state") as tmp:
    store.save_arrays(tmp, arrays)
    store.write_text(os.path.join(tmp, BLOCK_JSON), meta)


def _block_on_disk(directory: str, i: int, fingerprint: str) -> bool:
  path = os.path.join(_block_dir(directory, i), BLOCK_JSON)
  if not os.path.isfile(path):
    return False
  meta = store.read_json(path, "spilled block")
  return meta.get("version") == VERSION and meta.get("fingerprint") == fingerprint


def save_state(directory: str, state: PipelineState, *, fingerprint: str) -> str:
  """Save `state` as `directory/state-<next_block>` atomically and delete the older states.

  Args:
    directory: the run's state directory (created if missing).
    state: a PipelineState (x [N, L, D] device or host array; blocks: params dicts with QuantizedWeight
      leaves, or SpilledBlock references of this directory; report: JSON-serializable entries;
      orders: {(layer, name): int array} or None).
    fingerprint: the run's identity; `load_state` refuses a state written under another one.
  Returns:
    the path of the new state directory. Every array is stored bit-exactly (its own dtype). A block dict
    is written unless this run's state already holds it (blocks below the newest saved state's next_block).
  """
  fingerprint = _check_fingerprint(fingerprint)
  if not isinstance(state, PipelineState):
    raise ConfigError(f"save_state: state is a {type(state).__name__}; expected a quant.pipeline.PipelineState")
  k = int(state.next_block)
  if len(state.blocks) != k:
    raise ConfigError(f"save_state: state has {len(state.blocks)} finished blocks for next_block={k}; expected "
                      "equal (save the state the pipeline hands to its callback)")
  directory = os.path.abspath(os.fspath(directory))
  _clean_tmp(directory)
  saved = max((j for j, _ in _states(directory)), default=0)
  for i, blk in enumerate(state.blocks):
    if isinstance(blk, SpilledBlock):
      if blk.fingerprint != fingerprint or os.path.abspath(blk.path) != _block_dir(directory, i):
        raise ConfigError(f"save_state: block {i} is spilled at {blk.path} under run {blk.fingerprint!r}; "
                          f"expected {_block_dir(directory, i)} under {fingerprint!r}")
      if not _block_on_disk(directory, i, fingerprint):
        raise CheckpointError(f"save_state: spilled block {i} is missing from {blk.path}; the state directory "
                              "was modified, start over")
    elif i >= saved or not _block_on_disk(directory, i, fingerprint):
      _write_block(directory, i, blk, fingerprint)
  orders = None if state.orders is None else sorted((int(l), str(n)) for l, n in state.orders)
  arrays = {"x": state.x}
  if orders:
    arrays["orders"] = store.nest({(str(l), n): np.asarray(state.orders[(l, n)]) for l, n in orders})
  meta = store.to_json({
      "format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "next_block": k,
      "x": tree.array_spec(state.x),
      "orders": None if orders is None else [[l, n, tree.array_spec(np.asarray(state.orders[(l, n)]))]
                                            for l, n in orders],
      "global_bits": state.global_bits, "report": list(state.report)}, "save_state: the report")
  need = int(np.prod(np.shape(state.x))) * np.dtype(state.x.dtype).itemsize + len(meta)
  target = store.preflight(os.path.join(directory, f"state-{k:06d}"), need, overwrite=True, what="save_state")
  with fileio.atomic_dir(target, overwrite=True, what="save_state") as tmp:
    store.save_arrays(tmp, arrays)
    store.write_text(os.path.join(tmp, STATE_JSON), meta)
  for j, path in _states(directory):
    if j != k:
      shutil.rmtree(path, ignore_errors=True)
  return target


def spill(directory: str, state: PipelineState, *, fingerprint: str) -> PipelineState:
  """`state` with every finished block replaced by its SpilledBlock (call after `save_state`): the caller
  drops the blocks from memory; `load_block` / `SpilledBlock.load` read them back."""
  fingerprint = _check_fingerprint(fingerprint)
  refs = []
  for i, blk in enumerate(state.blocks):
    if not isinstance(blk, SpilledBlock) and not _block_on_disk(directory, i, fingerprint):
      raise ConfigError(f"spill: block {i} is not saved in {directory}; call save_state first")
    refs.append(blk if isinstance(blk, SpilledBlock) else SpilledBlock(_block_dir(directory, i), i, fingerprint))
  return dataclasses.replace(state, blocks=refs)


def spilling_hook(directory: str, fingerprint: str, then=None):
  """A `BlockHooks.on_block` for `quantize_model`: after every block, `save_state` then `spill` (the finished
  blocks wait on disk; the host holds one block and the activations), then `then(state, block_report)` if given
  (it sees the spilled state)."""
  def on_block(state: PipelineState, block_report: list) -> PipelineState:
    save_state(directory, state, fingerprint=fingerprint)
    state = spill(directory, state, fingerprint=fingerprint)
    if then is not None:
      then(state, block_report)
    return state
  return on_block


def load_state(directory: str, fingerprint: str, *, lazy: bool = False) -> PipelineState | None:
  """The newest complete state in `directory` as a PipelineState (host numpy arrays), or None if none.

  lazy=True leaves the finished blocks on disk (SpilledBlock references) instead of reading them.
  Raises ConfigError naming both fingerprints when the state was written by a different run, and
  CheckpointError / FormatError for a corrupt state or an unknown packed layout.
  """
  fingerprint = _check_fingerprint(fingerprint)
  found = _states(directory)
  if not found:
    return None
  k, path = found[-1]
  meta = store.read_json(os.path.join(path, STATE_JSON), "pipeline state")
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise CheckpointError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; expected "
                          f"{FORMAT!r} version {VERSION} (a state of another qdllm-jax version: delete it to "
                          "start over)")
  if meta.get("fingerprint") != fingerprint:
    raise ConfigError(f"{path}: the saved state belongs to run fingerprint {meta.get('fingerprint')!r} but the "
                      f"current run's fingerprint is {fingerprint!r}; the model, calibration data or rules "
                      "changed. Use a new state directory (or delete this one) to start over")
  if meta.get("next_block") != k:
    raise CheckpointError(f"{path}: state.json says next_block={meta.get('next_block')!r}, the directory name "
                          f"says {k}; the state is corrupt")
  specs = {"x": {"shape": meta["x"]["shape"], "dtype": meta["x"]["dtype"]}}
  if meta["orders"]:
    specs["orders"] = store.nest({(str(l), n): a for l, n, a in meta["orders"]})
  arrays = store.restore_arrays(path, specs)
  missing = [i for i in range(k) if not _block_on_disk(directory, i, fingerprint)]
  if missing:
    raise CheckpointError(f"{path}: finished blocks {missing[:4]} are missing from {directory}/{BLOCKS_DIR}; the "
                          "state is incomplete, delete it to start over")
  blocks = [SpilledBlock(_block_dir(directory, i), i, fingerprint) for i in range(k)]
  orders = None if meta["orders"] is None else {(l, n): arrays["orders"][str(l)][n] for l, n, _ in meta["orders"]}
  return PipelineState(next_block=k, x=arrays["x"], blocks=blocks if lazy else [b.load() for b in blocks],
                       report=list(meta["report"]), orders=orders, global_bits=meta["global_bits"])
