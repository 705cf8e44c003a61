"""`ModelConfig`: one frozen description of a network, parsed from HF `config.json` by its family.

`arch` names the model family (models/families.py: "llada", "dream", "bert"); each family module parses
config.json into this one dataclass with the helpers below (`get_field`, `freeze`, `refuse_value`) and
declares its tensor names. LLaDA and Dream are pre-norm Llama-style decoders without a causal mask; what
differs is captured by a few fields (`qkv_bias`, `n_kv_heads`, `rope_full_precision`, `norm_eps`,
`rope_theta`, `shift_logits`, `positions_skip_padding`). BERT adds `type_vocab_size`, `tensor_prefix` and
`has_head`. The config is hashable, so it is a static argument of every jitted function.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qdllm_jax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters.

  Attributes:
    arch: the family name (models/families.py): "llada", "dream" or "bert".
    vocab_size: rows of the embedding and LM head (LLaDA's `embedding_size`, which may pad `vocab_size`).
    d_model: residual width D.
    n_layers: number of transformer blocks.
    n_heads, n_kv_heads, head_dim: attention heads; n_heads % n_kv_heads == 0 (GQA when unequal).
    mlp_hidden: MLP hidden width F (SwiGLU for LLaDA/Dream, GELU for BERT).
    rope_theta: RoPE base; half-split (HF Llama) layout (0.0: no RoPE, BERT).
    norm_eps: RMSNorm / LayerNorm epsilon.
    qkv_bias: q/k/v projections carry biases (Dream; LLaDA with include_qkv_bias).
    tie_embeddings: LM head shares the embedding matrix.
    rope_full_precision: rotate q/k in float32 and cast back (LLaDA); else cos/sin are cast to the
      activation dtype first (Qwen2/Dream).
    mask_id, bos_id, eos_id, pad_id: special token ids (None where the checkpoint has none).
    max_seq_len: the longest context the checkpoint supports (BERT: its absolute position table).
    hf_vocab_size: the `vocab_size` field as written in config.json (LLaDA keeps it beside embedding_size).
    shift_logits: logits at position i predict token i+1 (Dream); consumers shift them by one.
    positions_skip_padding: RoPE positions are cumsum(mask) - 1 under padding (Dream), else 0..T-1.
    type_vocab_size: rows of BERT's token-type embedding (0 elsewhere).
    tensor_prefix: prefix of the backbone's tensor names in the checkpoint (BERT: "" or "bert.").
    has_head: the checkpoint has an output head (LM / MLM head); BERT without one returns hidden states.
    raw: the parsed config.json as a tuple of items, written back unchanged by `save_pretrained`.
  """
  arch: str
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_hidden: int
  rope_theta: float
  norm_eps: float
  qkv_bias: bool = False
  tie_embeddings: bool = False
  rope_full_precision: bool = True
  mask_id: int | None = None
  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int | None = None
  max_seq_len: int = 4096
  hf_vocab_size: int | None = None
  shift_logits: bool = False
  positions_skip_padding: bool = False
  type_vocab_size: int = 0
  tensor_prefix: str = ""
  has_head: bool = True
  raw: tuple = ()

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise CheckpointError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.rope_theta and self.head_dim % 2:
      raise CheckpointError(f"head_dim={self.head_dim} must be even for RoPE")

  @property
  def q_dim(self) -> int:
    return self.n_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.n_kv_heads * self.head_dim

  def raw_dict(self) -> dict:
    return dict(self.raw)


def get_field(d: Mapping[str, Any], key: str, path: str, default: Any = dataclasses.MISSING):
  """d[key] (not None), else `default`; CheckpointError naming `path` when missing without a default."""
  if key in d and d[key] is not None:
    return d[key]
  if default is dataclasses.MISSING:
    raise CheckpointError(f"{path}: config field {key!r} is missing; a real config.json of this model type has it")
  return default


def freeze(v):
  """A JSON value as nested tuples (hashable), for `ModelConfig.raw`."""
  if isinstance(v, dict):
    return tuple((k, freeze(x)) for k, x in v.items())
  if isinstance(v, list):
    return tuple(freeze(x) for x in v)
  return v


def _thaw_raw(raw):
  def thaw(v):
    if isinstance(v, tuple) and v and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in v):
      return {k: thaw(x) for k, x in v}
    if isinstance(v, tuple):
      return [thaw(x) for x in v]
    return v
  return {k: thaw(v) for k, v in raw}


def refuse_value(d, path, key, bad, why):
  """CheckpointError when config.json sets `key` to the unsupported value `bad` (`why` says what it means)."""
  if key in d and d[key] == bad:
    raise CheckpointError(f"{path}: {key}={bad!r} is not supported ({why}); LLaDA/Dream checkpoints use the default")


def config_to_hf(cfg: ModelConfig) -> dict:
  """The config.json dict to write next to the weights: the original fields, unchanged."""
  if cfg.raw:
    return _thaw_raw(cfg.raw)
  raise CheckpointError("this ModelConfig was not parsed from a config.json; build it with "
                        "models.families.config_from_hf (or llada_config / dream_config)")
