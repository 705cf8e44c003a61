"""Resumable quantization: the `PipelineState` after each block, saved atomically and restored bit-exactly.

    fp = run_fingerprint(...)                                  # any string naming the run's inputs
    state = load_state(dir, fp)                                # None on a fresh start
    quantize_model(src, ids, plan, resume=state,
                   callback=lambda s, rep: save_state(dir, s, fingerprint=fp))

Layout: `dir/state-<next_block:06d>/` holding `arrays/` (Orbax: the propagated activations x [N, L, D], the
finished blocks' params with their packed fields, the global-ABMP orders) and `state.json` (fingerprint,
next_block, the blocks' structure spec, report so far, global_bits). Each state directory is written to a
temporary sibling and renamed into place; the previous one is deleted only after that rename. A kill -9 at
any point therefore leaves the newest complete state (the previous one, or the new one) loadable; stale
temporary directories are removed by the next `save_state`.
"""
from __future__ import annotations

import os
import re
import shutil

import numpy as np

from qdllm_jax.checkpoint import store, tree
from qdllm_jax.errors import CheckpointError, ConfigError
from qdllm_jax.quant.pipeline import PipelineState

STATE_JSON = "state.json"
FORMAT = "qdllm-jax.pipeline_state"
VERSION = 1
_NAME = re.compile(r"^state-(\d{6})$")


def _states(directory: str) -> list[tuple[int, str]]:
  """[(next_block, path)] of the complete state directories, ascending."""
  if not os.path.isdir(directory):
    return []
  found = [(int(m.group(1)), os.path.join(directory, n)) for n in os.listdir(directory) if (m := _NAME.match(n))]
  return sorted(found)


def _check_fingerprint(fingerprint) -> str:
  if not isinstance(fingerprint, str) or not fingerprint:
    raise ConfigError(f"fingerprint={fingerprint!r}; expected a non-empty string identifying the run (model, "
                      "calibration data, rules)")
  return fingerprint


def save_state(directory: str, state: PipelineState, *, fingerprint: str) -> str:
  """Save `state` as `directory/state-<next_block>` atomically and delete the older states.

  Args:
    directory: the run's state directory (created if missing).
    state: a PipelineState (x [N, L, D] device or host array; blocks: params dicts with QuantizedWeight
      leaves; report: JSON-serializable entries; orders: {(layer, name): int array} or None).
    fingerprint: the run's identity; `load_state` refuses a state written under another one.
  Returns:
    the path of the new state directory. Every array is stored bit-exactly (its own dtype).
  """
  fingerprint = _check_fingerprint(fingerprint)
  if not isinstance(state, PipelineState):
    raise ConfigError(f"save_state: state is a {type(state).__name__}; expected a quant.pipeline.PipelineState")
  k = int(state.next_block)
  if len(state.blocks) != k:
    raise ConfigError(f"save_state: state has {len(state.blocks)} finished blocks for next_block={k}; expected "
                      "equal (save the state the pipeline hands to its callback)")
  blocks_arrays, blocks_spec = tree.encode(list(state.blocks), "state.blocks")
  orders = None if state.orders is None else sorted((int(l), str(n)) for l, n in state.orders)
  arrays = {"x": state.x, "blocks": blocks_arrays}
  if orders:
    arrays["orders"] = store.nest({(str(l), n): np.asarray(state.orders[(l, n)]) for l, n in orders})
  meta = store.to_json({
      "format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "next_block": k,
      "x": tree.array_spec(state.x), "blocks": blocks_spec,
      "orders": None if orders is None else [[l, n, tree.array_spec(np.asarray(state.orders[(l, n)]))]
                                            for l, n in orders],
      "global_bits": state.global_bits, "report": list(state.report)}, "save_state: the report")
  need = int(np.prod(np.shape(state.x))) * np.dtype(state.x.dtype).itemsize + sum(
      tree.leaf_nbytes(s) for _, s in tree.iter_specs(blocks_spec)) + len(meta)
  for n in os.listdir(directory) if os.path.isdir(directory) else ():
    if n.startswith(".state-") and ".tmp-" in n:  # left by a killed writer (one writer per directory)
      shutil.rmtree(os.path.join(directory, n), ignore_errors=True)
  target = store.preflight(os.path.join(directory, f"state-{k:06d}"), need, overwrite=True, what="save_state")
  with store.atomic_dir(target, overwrite=True, what="save_state") as tmp:
    store.save_arrays(tmp, arrays)
    store.write_text(os.path.join(tmp, STATE_JSON), meta)
  for j, path in _states(directory):
    if j != k:
      shutil.rmtree(path, ignore_errors=True)
  return target


def load_state(directory: str, fingerprint: str) -> PipelineState | None:
  """The newest complete state in `directory` as a PipelineState (host numpy arrays), or None if none.

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
                          f"{FORMAT!r} version {VERSION}")
  if meta.get("fingerprint") != fingerprint:
    raise ConfigError(f"{path}: the saved state belongs to run fingerprint {meta.get('fingerprint')!r} but the "
                      f"current run's fingerprint is {fingerprint!r}; the model, calibration data or rules "
                      "changed. Use a new state directory (or delete this one) to start over")
  if meta.get("next_block") != k:
    raise CheckpointError(f"{path}: state.json says next_block={meta.get('next_block')!r}, the directory name "
                          f"says {k}; the state is corrupt")
  tree.check_layout(meta["blocks"], path)
  specs = {"x": {"shape": meta["x"]["shape"], "dtype": meta["x"]["dtype"]},
           "blocks": store.nest(tree.stored_arrays(meta["blocks"]))}
  if meta["orders"]:
    specs["orders"] = store.nest({(str(l), n): a for l, n, a in meta["orders"]})
  arrays = store.restore_arrays(path, specs)
  blocks = tree.decode(meta["blocks"], arrays.get("blocks", {}), path, ())
  orders = None if meta["orders"] is None else {(l, n): arrays["orders"][str(l)][n] for l, n, _ in meta["orders"]}
  return PipelineState(next_block=k, x=arrays["x"], blocks=list(blocks), report=list(meta["report"]),
                       orders=orders, global_bits=meta["global_bits"])
