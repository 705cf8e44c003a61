"""`Family`: everything the rest of the package needs to know about one model architecture.

A family module (models/llada.py, models/dream.py, models/bert.py) builds one `Family` and the registry
(models/families.py) lists it; the loader, the hf name mapping, calibration, the quantization pipeline, the
rules and the baselines look the family up by `ModelConfig.arch` instead of branching on it.

The block interface every family implements (B batch, T tokens, D = d_model):
  ctx = block_context(cfg, B, T, attention_mask)      # whatever every block needs (RoPE tables, key mask)
  x = embed(params, input_ids, cfg)                     # int32 [B, T] -> [B, T, D]
  x = block_forward(p, x, cfg, ctx, return_taps=False, act=None)   # [B, T, D] -> [B, T, D] (, taps)
  out = head(params, cfg, x)                             # float32 [B, T, V] logits or [B, T, D] states
`taps` are the inputs of the linear groups (`linear_groups`: tap -> linears reading it); `upstream[tap]` are
the linears of the same block whose quantization changes that tap's input.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping


def _identity_refine(cfg, tensor_names, path):
  return cfg


def _no_ignored(name: str) -> bool:
  return False


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
  """One architecture.

  Attributes:
    name: the `ModelConfig.arch` value ("llada", "dream", "bert").
    model_types: config.json `model_type` values it loads.
    parse_config: (config.json dict, path) -> ModelConfig; CheckpointError on unsupported fields.
    top_names, block_names: (cfg[, layer]) -> {canonical name: HF tensor name}. A block linear's tensor name is
      "<module path>.<param>" (the HF convention, e.g. "...q_proj.weight"): rules tables and reports name the
      linear by its module path (models/hf.py `module_path`), so the paths of a block's linears are distinct.
    param_shapes: cfg -> the params pytree's shapes ({"blocks": [...], top names...}).
    param_axes: {canonical param name: its logical axes}, one name per dimension (None: replicated), mapped to
      mesh axes by sharding.LOGICAL_RULES; every name of `param_shapes` has an entry.
    linear_groups: {tap: linear names reading that input}; its order is the block's order.
    upstream: {tap: linears of the block upstream of the tap}.
    embed_keys: the top-level params `embed` reads.
    embed, block_context, block_forward, head, forward: the computation (module docstring).
    calib_seed: the default MCS seed_x of the released calibration for this family.
    norm_kind: "rms_pre" (pre-norm RMSNorm blocks: rotation / scale fusion into the norms applies) or
      "ln_post" (post-LN blocks with LayerNorm biases).
    refine: (cfg, set of tensor names, directory) -> cfg, run by the loader on a checkpoint directory.
    ignored_tensor: name -> True for tensors a checkpoint may hold that are not params (accepted, unread).
    description: the checkpoints it loads, for messages (e.g. "LLaDA-8B, LLaDA-1.5").
    sampler: the masked-diffusion sampler and likelihood convention the family uses ("llada": LLaDA's sampler and
      Monte-Carlo estimator, logits aligned with the tokens; "dream": Dream's, logits shifted by one), or None for
      a model that does not generate (an encoder).
    encoder: scored by fidelity protocols against its FP source (eval/fidelity.py) instead of task protocols.
    module_orders: {name: groups of linears}: named quantization orders beside "standard" (`standard_order`) that
      `quant.module_order` may pick (the decoders: "llada_runner", the published LLaDA runner's order).
    presets: {preset name: ModelConfig}: architectures planned without weights (`config.model_preset`, --dry_run);
      names are unique across the registry (models/families.py `preset`).
    scale_folds: {tap: the op whose output is that tap, or None}: where a per-input-channel scale s of the tap's
      linear group (AWQ, arXiv 2306.00978 §3.2) folds exactly, W <- W diag(s) with the op's output divided by s:
      a norm weight [D] (pre-norm decoders: the tap is the norm's output and nothing else reads it) or a
      linear whose rows (and bias) become the tap channel for channel (v before o; up before down in SwiGLU,
      where down reads silu(gate h) * up h). None: no op folds it (the tap also feeds the residual, or a
      non-homogeneous activation such as GELU sits in between), so the scale stays an online divisor
      x -> x * (1/s) (`act_fake_quant.online_transform` with a vector). Taps missing here are never scaled.
  """
  name: str
  model_types: tuple
  parse_config: Callable
  top_names: Callable
  block_names: Callable
  param_shapes: Callable
  param_axes: Mapping
  linear_groups: Mapping
  upstream: Mapping
  embed_keys: tuple
  embed: Callable
  block_context: Callable
  block_forward: Callable
  head: Callable
  forward: Callable
  calib_seed: int = 0
  norm_kind: str = "rms_pre"
  refine: Callable = _identity_refine
  ignored_tensor: Callable = _no_ignored
  description: str = ""
  sampler: str | None = None
  encoder: bool = False
  presets: Mapping = dataclasses.field(default_factory=dict)
  module_orders: Mapping = dataclasses.field(default_factory=dict)
  scale_folds: Mapping = dataclasses.field(default_factory=dict)

  @property
  def linears(self) -> tuple:
    """Every block linear's canonical name, in block order."""
    return tuple(n for g in self.linear_groups.values() for n in g)

  @property
  def tap_of(self) -> dict:
    """{linear: the tap (linear group input) it reads}."""
    return {n: g for g, names in self.linear_groups.items() for n in names}

  @property
  def standard_order(self) -> tuple:
    """The linear groups in block order: the pipeline's default module order."""
    return tuple(tuple(g) for g in self.linear_groups.values())
