"""Device meshes and the one table of logical-axis rules (MaxText style).

Every array dimension the project shards carries a *logical* name; `LOGICAL_RULES` maps logical names to
mesh axes, in one place. Change the rules (or pass your own) to change the parallelism; the model and
solver code never name mesh axes directly. Which logical axes each param has is the model family's fact
(`Family.param_axes`, {canonical name: logical axes}); callers pass that table in.

Logical names (None in a param's axes: that dimension is always replicated):
  batch  calibration / evaluation sequences          -> "data"
  embed  the residual width D                        -> None (replicated)
  heads  attention projections' head*dim width       -> "model"
  kv     KV projections' width (few heads under GQA)  -> None
  mlp    the MLP hidden width F                       -> "model"
  vocab  embedding / LM-head rows                     -> "model"
  rows   a weight's output rows inside a solver       -> "model"
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qdllm_jax.errors import ConfigError

log = logging.getLogger(__name__)

LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"), ("embed", None), ("heads", "model"), ("kv", None), ("mlp", "model"),
    ("vocab", "model"), ("rows", "model"))


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], devices=None) -> Mesh:
  """A mesh of `prod(shape)` devices with explicit `axis_types` (Auto: XLA propagates the rest).

  Raises ConfigError when the device count does not match, naming both numbers.
  """
  shape, axis_names = tuple(int(s) for s in shape), tuple(axis_names)
  if len(shape) != len(axis_names):
    raise ConfigError(f"mesh shape {shape} and axis names {axis_names} differ in length")
  devices = list(devices if devices is not None else jax.devices())
  need = int(np.prod(shape))
  if need != len(devices):
    raise ConfigError(f"mesh {dict(zip(axis_names, shape))} needs {need} devices but {len(devices)} are "
                      f"available; set config.mesh.shape to multiply to {len(devices)}")
  return jax.make_mesh(shape, axis_names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, rules=LOGICAL_RULES,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for logical `axes`. A mesh axis absent from the mesh, already used, or that does not
  divide the dimension (when `shape` is given) leaves that dimension replicated."""
  table = dict(rules)
  used, spec = set(), []
  for i, name in enumerate(axes):
    ax = table.get(name) if name is not None else None
    ok = ax is not None and ax in mesh.axis_names and ax not in used
    if ok and shape is not None and shape[i] % mesh.shape[ax]:
      ok = False
    spec.append(ax if ok else None)
    if ok:
      used.add(ax)
  return P(*spec)


def named(mesh: Mesh, axes: Sequence[str | None], shape=None, rules=LOGICAL_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, shape))


def param_shardings(params: dict, mesh: Mesh, param_axes: Mapping[str, tuple], rules=LOGICAL_RULES):
  """A pytree of NamedSharding matching `params`: a dense leaf named n (its last dict key) is split as
  `param_axes[n]` (the family's `Family.param_axes`) says; other leaves, and names missing there, are replicated."""
  def one(path, leaf):
    name = next((p.key for p in reversed(path) if isinstance(p, jax.tree_util.DictKey)), None)
    axes = param_axes.get(name)
    shape = getattr(leaf, "shape", None)
    if axes is None or shape is None or len(axes) != len(shape):
      return NamedSharding(mesh, P())
    return named(mesh, axes, shape, rules)
  return jax.tree_util.tree_map_with_path(one, params)


def host_array(a) -> np.ndarray:
  """a as a host NumPy array. A jax.Array that spans devices of other processes (multi-host runs) is
  all-gathered, so this is a collective there: every process must call it, and every process gets the whole
  array."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return np.asarray(a)


def host_tree(tree):
  """`host_array` over every array leaf of a pytree (QuantizedWeight fields included)."""
  return jax.tree.map(lambda a: host_array(a) if isinstance(a, (jax.Array, np.ndarray)) else a, tree)


def shard_rows(x, mesh):
  """x [N, ...] placed on `mesh` with rows over the data axis (replicated when N does not divide)."""
  sh = named(mesh, ("batch",) + (None,) * (np.ndim(x) - 1), np.shape(x))
  if isinstance(x, jax.Array):
    return jax.device_put(x, sh)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])


def make_run_mesh(axes: dict):
  """The run's mesh over the first prod(sizes) devices (all of them on multi-host runs)."""
  need = int(np.prod(list(axes.values())))
  devices = jax.devices()
  if need < len(devices) and jax.process_count() == 1:
    log.info("mesh %s uses %d of the %d local devices", axes, need, len(devices))
    devices = devices[:need]
  return make_mesh(tuple(axes.values()), tuple(axes), devices=devices)
