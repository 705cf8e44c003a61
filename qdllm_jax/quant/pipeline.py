"""Sequential, streaming post-training quantization of a model of any family (Quant-dLLM §0, GPTQ convention).

Only one block's weights plus the calibration activations are resident. With x_0 = Embed[calib_ids]:

  for block b = 0..n_layers-1:
    for each group of linears G, in `module_order` (default: the family's linear groups in block order,
                                    e.g. the decoders' [q,k,v] -> [o] -> [gate,up] -> [down]):
      H_G = (2/n) sum_s X_s^T X_s    over the block run on x_b with the already quantized groups in place
      W_hat = quantize(W, H_G)       for every linear of G (one shared-H call per rule), per the plan
    x_{b+1} = block_b(x_b) with all of its quantized weights              (sequential propagation)

`module_order` "standard" is the family's block order; a family may name others (`Family.module_orders`: the
decoders' "llada_runner" gives the published LLaDA runner's singleton groups attn_out, ff_out, q, k, v, ff_proj,
up_proj, §6). A tap's H depends only on the quantized modules upstream of it, so H is cached
per (tap, quantized upstream set) and groups reading the same input share one capture.

Global ABMP (`global_abmp=...`): sequential propagation only knows a block's H when it gets there, so
the per-128-column-block saliences are first computed in an FP pass over all blocks (FP-propagated
activations, FP weights inside each block), orders are allocated across the whole model under one
exact bits budget with `abmp.allocate_orders_global`, and the sequential pass then uses those fixed
orders. The per-matrix default (`abmp_ratio` inside the rule) needs no extra pass.

The state between blocks is explicit (`PipelineState`: next block index, its input activations, the done
blocks' quantized params, the report so far, fixed orders); `hooks.on_block(state, block_report)` runs after
every block (`BlockHooks`), and `quantize_model(..., resume=state)` continues from a saved state.

Per matrix the report logs the relative output error on the calibration data,
    rel_err = ||(W - W_hat) X|| / ||W X|| = sqrt(tr(E H E^T) / tr(W H W^T)),  E = W - W_hat,
plus the quantizer's layer loss, damping and orders (from its info) and the time.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.calib import capture, salience
from qdllm_jax.errors import ConfigError
from qdllm_jax.models.families import family_of
from qdllm_jax.models.family import Family
from qdllm_jax.models.model_config import ModelConfig
from qdllm_jax.quant import api, methods, packed
from qdllm_jax.quant import rules as rules_lib
from qdllm_jax.quant.block_source import as_source, embed_inputs, release_host_memory
from qdllm_jax.sharding import host_tree

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineState:
  """Everything `quantize_model` needs to continue after a block.

  Attributes:
    next_block: index of the next block to quantize.
    x: its input activations [N, L, D] (model dtype; device or host array).
    blocks: quantized params of blocks 0..next_block-1 (QuantizedWeight leaves; host arrays), or references
      to them on disk (objects with .load(), e.g. `checkpoint.state.SpilledBlock`) handed back by a hook.
    report: per-matrix report entries so far.
    orders: {(layer, name): int orders per column block} fixed by global ABMP, or None.
    global_bits: the true bits per weight of the global ABMP allocation, or None.
  """
  next_block: int
  x: object
  blocks: list
  report: list
  orders: dict | None = None
  global_bits: float | None = None


@dataclasses.dataclass(frozen=True)
class BlockHooks:
  """What a caller plugs into the block loop of `quantize_model` (all optional).

  Attributes:
    place: x -> x, where a block's inputs live between blocks (e.g. host memory, or rows sharded over the data
      axis); applied to the embedded inputs, to a resumed state's inputs and to every block's outputs.
    on_matrix: entry -> None after every quantized matrix (its report entry), e.g. a progress bar.
    on_block: (state, block_report) -> state or None after every block: save the state, spill the finished
      blocks to disk (checkpoint.state.spilling_hook), synchronise hosts; a returned state replaces the loop's.
  """
  place: Callable | None = None
  on_matrix: Callable | None = None
  on_block: Callable | None = None


def module_groups(module_order, family: Family) -> tuple:
  """Groups of canonical linear names in processing order, from "standard" (the family's block order), one of
  the family's named `module_orders` or a list of lists. Every linear of `family` must appear exactly once and a
  group's linears must read the same input (shared H). ConfigError otherwise, naming what this family accepts."""
  if isinstance(module_order, str):
    named = {"standard": family.standard_order, **family.module_orders}
    if module_order not in named:
      raise ConfigError(f"module_order={module_order!r}; expected one of {sorted(named)} for {family.name} models, "
                        "or a list of groups of its linears")
    module_order = named[module_order]
  groups = tuple(tuple(g) for g in module_order)
  flat = [n for g in groups for n in g]
  if sorted(flat) != sorted(family.linears):
    raise ConfigError(f"module_order {groups} must list each of {family.linears} exactly once")
  for g in groups:
    if len({family.tap_of[n] for n in g}) != 1:
      raise ConfigError(f"module_order group {g} mixes linears with different inputs; a group shares one H, "
                        f"so it may only hold linears of one tap ({family.tap_of})")
  return groups


def relative_output_error(w, w_hat, h) -> float:
  """||(W - W_hat) X|| / ||W X|| = sqrt(tr(E H E^T) / tr(W H W^T)). w, w_hat [r, c]; h float32 [c, c]."""
  w = jnp.asarray(w, jnp.float32)
  e = w - jnp.asarray(w_hat, jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  num = jnp.sum(jnp.matmul(e, h, precision=hp) * e)
  den = jnp.sum(jnp.matmul(w, h, precision=hp) * w)
  return float(jnp.sqrt(num / jnp.maximum(den, 1e-30)))


def _rel_err(info, w, w_hat, h) -> float:
  """sqrt of the quantizer's relative_sq_output_error (tr(E H E^T) / tr(W H W^T)) when it reports one."""
  r = (info or {}).get("relative_sq_output_error")
  return float(np.sqrt(max(float(r), 0.0))) if r is not None else relative_output_error(w, w_hat, h)


def _scalar(v):
  if isinstance(v, (jax.Array, np.ndarray)):
    return v.item() if v.size == 1 else np.asarray(v).tolist()
  return v


def _quantize_batch(ws: list, h, rule: rules_lib.Rule, orders: list | None, row_sharding=None) -> list:
  """[(QuantizedWeight, info)] for matrices sharing one H: one damping/Cholesky for all of them, with fixed
  per-matrix orders [len(ws), nb] when given (global ABMP)."""
  kw = rule.kwargs()
  if row_sharding is not None and "row_sharding" in methods.get_method(rule.method).options:
    kw["row_sharding"] = row_sharding
  if orders is not None:
    kw = dict(kw, orders=np.stack([np.asarray(o) for o in orders]) if len(ws) > 1 else orders[0])
  if len(ws) == 1:
    return [api.quantize_weight(ws[0], h, return_info=True, **kw)]
  return list(api.quantize_weights_shared(ws, h, return_info=True, **kw))


_INFO_FIELDS = {"loss": "solver_loss", "layer_loss": "layer_loss", "damp": "percdamp", "delta": "delta",
                "orders": "orders", "bits_per_weight": "bits_per_weight", "dead_columns": "dead_columns"}


def _info_entry(info) -> dict:
  """Report fields from the quantizer's info: loss (the solver's sum (w - q)^2 / U_cc^2 / 2, the reference's
  logged error), layer_loss tr(E H E^T), damp (percdamp used), delta, orders, bits_per_weight."""
  info = dict(info or {})
  out = {k: _scalar(info.get(src)) for k, src in _INFO_FIELDS.items()}
  if info.get("orders") is not None:
    out["orders"] = np.asarray(info["orders"]).reshape(-1).tolist()
  return out


def check_plan(plan: rules_lib.Plan, cfg: ModelConfig) -> None:
  """Validate every rule against its module's shape and the quantizer's options, before any heavy work.

  Raises ConfigError naming the module: unknown option for the method, group_size not dividing in_features
  (quant_dllm: also a multiple of 32; gptq: dividing 128 or a multiple of it), bits out of range.
  """
  shapes = family_of(cfg).param_shapes(cfg)["blocks"][0]
  for path, rule in plan.modules.items():
    if rule is None:
      continue
    _, name = plan.names[path]
    n_in = shapes[name][1]
    method = methods.get_method(rule.method)
    allowed = set(method.options) | {"abmp_ratio"}
    bad = sorted(set(dict(rule.options)) - allowed)
    why = None
    if bad:
      why = f"unknown option(s) {bad} for {rule.method} (allowed: {sorted(allowed)})"
    elif (shape_bad := method.check_shape(rule.bits, rule.group_size, n_in)) is not None:
      why = f"{shape_bad[0]} must be {shape_bad[1]}"
    if why:
      raise ConfigError(f"rule for {path} ({rule}): {why}; fix the rules table")


def quantize_block(p: dict, x, cfg: ModelConfig, layer: int, plan: rules_lib.Plan, *, groups=None,
                   chunk_size: int = 8, key_mask=None, orders: dict | None = None, row_sharding=None,
                   chunk_sharding=None, on_matrix: Callable | None = None):
  """Quantize one block group by group; return (quantized params, outputs [N, L, D], report entries).

  Args:
    p: block `layer`'s params (dense arrays, model dtype).
    x: its calibration inputs [N, L, D].
    plan: resolved rules (None rules leave a linear in full precision).
    groups: linear groups in order (see `module_groups`; None: the family's standard order).
    orders: {(layer, name): orders} fixed by global ABMP, or None.
    row_sharding: None, or (mesh, axis): GPTQ / DAQ solve the output rows split over that mesh axis.
    chunk_sharding: NamedSharding for the calibration chunks of host activations (capture.capture_block).
    on_matrix: called with every report entry as soon as its matrix is quantized.
  Returns:
    (params with QuantizedWeight for quantized linears, the block's outputs on x with every quantized weight
     in place (dequantized, model dtype), [report dict per quantized matrix]).
  """
  work, qparams, done, cache, report = dict(p), dict(p), set(), {}, []
  family = family_of(cfg)
  for group in (family.standard_order if groups is None else groups):
    todo = [n for n in group if plan.rule_for(layer, n) is not None]
    if not todo:
      continue
    tap = family.tap_of[group[0]]
    ckey = (tap, frozenset(done & set(family.upstream[tap])))
    if ckey not in cache:
      cache[ckey] = capture.capture_block(work, x, cfg, taps=(tap,), chunk_size=chunk_size, key_mask=key_mask,
                                          chunk_sharding=chunk_sharding,
                                          with_outputs=False).hessians[tap]
    h = cache[ckey]
    batches = {}
    for n in todo:
      batches.setdefault(plan.rule_for(layer, n), []).append(n)
    for rule, names in batches.items():
      ws = [jnp.asarray(p[n], jnp.float32) for n in names]
      fixed = None if orders is None else [orders.get((layer, n)) for n in names]
      fixed = None if fixed is None or any(o is None for o in fixed) else fixed
      t0 = time.perf_counter()
      results = jax.block_until_ready(_quantize_batch(ws, h, rule, fixed, row_sharding))
      dt = (time.perf_counter() - t0) / len(names)
      for n, w, (qw, info) in zip(names, ws, results):
        w_hat = jnp.asarray(qw.dequantize(), jnp.float32).reshape(w.shape)
        work[n] = w_hat.astype(p[n].dtype)
        qparams[n] = qw
        entry = dict(layer=layer, name=n, module=plan.path_of(layer, n), method=rule.method, bits=rule.bits,
                     group_size=rule.group_size, rel_err=_rel_err(info, w, w_hat, h), time_s=dt,
                     n_samples=int(x.shape[0]), shared_with=[m for m in names if m != n])
        entry.update(_info_entry(info))
        report.append(entry)
        log.info("block %d %-5s %s w%s g%s rel_err=%.4f loss=%s %.2fs", layer, n, rule.method, rule.bits,
                 rule.group_size, entry["rel_err"], "-" if entry["loss"] is None else f"{entry['loss']:.4g}", dt)
        if on_matrix is not None:
          on_matrix(entry)
      done.update(names)
  outputs = capture.block_outputs(work, x, cfg, chunk_size=chunk_size, key_mask=key_mask,
                                  chunk_sharding=chunk_sharding)
  return qparams, outputs, report


def quantize_model(source, calib_ids, plan, *, module_order="standard", chunk_size: int = 8, key_mask=None,
                   global_abmp: dict | None = None, resume: PipelineState | None = None,
                   offload_activations: bool = False, dequantize: bool = False, row_sharding=None,
                   chunk_sharding=None, hooks: BlockHooks | None = None):
  """Quantize every block linear of a model, streaming block by block (see module docstring): the one block loop
  of the package (the launch and the study plug saving, spilling, multi-host sync and progress in as `hooks`).

  Args:
    source: a CheckpointReader (only one block is read at a time), a Model, or (params, ModelConfig).
    calib_ids: int32 [N, L] calibration ids, already MCS-masked (`calib.mcs.calibration_inputs`).
    plan: a rules table (`rules.default_rules(...)`, a list of (regex, rule)) or a resolved `rules.Plan`.
    module_order: "standard", a name of the family's `module_orders` ("llada_runner") or a list of groups of
      canonical names (`module_groups`).
    chunk_size: sequences per jitted block pass.
    key_mask: optional bool [N, L] (False at padding; None for full windows).
    global_abmp: None (per-matrix ABMP from each rule's abmp_ratio) or kwargs of
      `calib.salience.global_orders` ({"ratio": 0.05} and/or {"target_bits": b}) to allocate the orders of all
      quant_dllm 2-bit linears model-wide first (module docstring).
    resume: a PipelineState to continue from (its x are the inputs of block `resume.next_block`).
    offload_activations: keep the [N, L, D] activations in host memory (chunks move to the device); the
      default placement when `hooks.place` is not given.
    dequantize: return dense fake-quantized weights (model dtype) instead of QuantizedWeight leaves.
    row_sharding: None, or (mesh, axis) to split each GPTQ / DAQ solve over the output rows (shard_map).
    chunk_sharding: NamedSharding of the calibration chunks of host activations (capture.capture_block).
    hooks: BlockHooks (placement, per-matrix and per-block callbacks).
  Returns:
    (params, report): the params pytree with quantized linears replaced (other leaves unchanged) and the
    list of per-matrix report dicts. When a hook left the finished blocks on disk (references with .load()),
    params["blocks"] keeps the references and the top params stay lazy where the source allows, so that
    `checkpoint.save_quantized` streams them part by part.
  """
  hooks = hooks or BlockHooks()
  src = as_source(source)
  cfg = src.config
  plan = rules_lib.resolve_rules(plan, cfg)
  check_plan(plan, cfg)
  groups = module_groups(module_order, family_of(cfg))
  if chunk_size < 1:
    raise ConfigError(f"chunk_size={chunk_size}; expected >= 1")
  place = hooks.place or (np.asarray if offload_activations else (lambda x: x))
  n, seqlen = np.shape(calib_ids)[:2] if np.ndim(calib_ids) == 2 else (None, None)
  if resume is None:
    if hooks.place is None:
      x = embed_inputs(src, calib_ids, offload_activations=offload_activations)
    else:
      x = place(embed_inputs(src, calib_ids, offload_activations=True))
    orders = bits = None
    if global_abmp is not None:
      orders, bits = salience.global_orders(src, x, plan, chunk_size=chunk_size, key_mask=key_mask,
                                            **dict(global_abmp))
    state = PipelineState(next_block=0, x=x, blocks=[], report=[], orders=orders, global_bits=bits)
  else:
    want = (n, seqlen, cfg.d_model)
    if tuple(np.shape(resume.x)) != want or len(resume.blocks) != resume.next_block or \
        not 0 <= resume.next_block <= cfg.n_layers:
      raise ConfigError(f"resume state does not fit: x {tuple(np.shape(resume.x))} (expected {want}), "
                        f"{len(resume.blocks)} done blocks for next_block={resume.next_block} of {cfg.n_layers}; "
                        "resume with the state saved by the same run")
    state = dataclasses.replace(resume, x=place(resume.x))
  for b in range(state.next_block, cfg.n_layers):
    p = jax.tree.map(jnp.asarray, src.block(b))  # a block may carry online transforms (a dict: QuaRot)
    qp, out, rep = quantize_block(p, state.x, cfg, b, plan, groups=groups, chunk_size=chunk_size,
                                  key_mask=key_mask, orders=state.orders, row_sharding=row_sharding,
                                  chunk_sharding=chunk_sharding, on_matrix=hooks.on_matrix)
    del p
    # a new state per block (lists are not mutated), so states handed to hooks stay valid snapshots
    state = dataclasses.replace(state, next_block=b + 1, x=place(out), blocks=state.blocks + [host_tree(qp)],
                                report=state.report + rep)
    if hooks.on_block is not None:
      state = hooks.on_block(state, rep) or state
    release_host_memory()
  # every block on disk (spilled by a hook) or dropped on a non-writing host; a lazily resumed state is loaded
  spilled = bool(state.blocks) and all(not isinstance(b, dict) for b in state.blocks)
  params = dict(src.lazy_top() if spilled and hasattr(src, "lazy_top") else src.top())
  load = lambda b: b.load() if hasattr(b, "load") else b  # noqa: E731  (also a lazily resumed state's blocks)
  if dequantize:
    params["blocks"] = [dense_block(load(b)) for b in state.blocks]
  else:
    params["blocks"] = list(state.blocks) if spilled else [load(b) for b in state.blocks]
  return params, state.report


def dense_block(blk: dict) -> dict:
  """A block with every QuantizedWeight replaced by its dequantized weight in the model dtype (the dtype of
  the block's norm weights), e.g. for `save_pretrained` (fake-quantized checkpoint, as the reference)."""
  dt = np.dtype(blk["attn_norm"].dtype)
  return {k: np.asarray(v.dequantize()).astype(dt) if isinstance(v, packed.QuantizedWeight) else v
          for k, v in blk.items()}  # other leaves (and the online transforms' dict) unchanged
