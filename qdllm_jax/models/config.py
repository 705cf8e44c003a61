"""`ModelConfig`: one frozen description of a LLaDA or Dream network, parsed from HF `config.json`.

Both architectures are pre-norm Llama-style decoders without a causal mask. What differs is captured by a
few fields (`arch`, `qkv_bias`, `n_kv_heads`, `rope_full_precision`, `norm_eps`, `rope_theta`); the tensor
names live in `models/hf.py`. The config is hashable, so it is a static argument of every jitted function.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qdllm_jax.errors import CheckpointError

ARCHS = ("llada", "dream")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters.

  Attributes:
    arch: "llada" (logits at i predict token i) or "dream" (logits at i predict token i+1).
    vocab_size: rows of the embedding and LM head (LLaDA's `embedding_size`, which may pad `vocab_size`).
    d_model: residual width D.
    n_layers: number of transformer blocks.
    n_heads, n_kv_heads, head_dim: attention heads; n_heads % n_kv_heads == 0 (GQA when unequal).
    mlp_hidden: SwiGLU hidden width F.
    rope_theta: RoPE base; half-split (HF Llama) layout.
    norm_eps: RMSNorm epsilon.
    qkv_bias: q/k/v projections carry biases (Dream; LLaDA with include_qkv_bias).
    tie_embeddings: LM head shares the embedding matrix.
    rope_full_precision: rotate q/k in float32 and cast back (LLaDA); else cos/sin are cast to the
      activation dtype first (Qwen2/Dream).
    mask_id, bos_id, eos_id, pad_id: special token ids (None where the checkpoint has none).
    max_seq_len: the longest context the checkpoint supports.
    hf_vocab_size: the `vocab_size` field as written in config.json (LLaDA keeps it beside embedding_size).
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
  raw: tuple = ()

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise CheckpointError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
    if self.n_heads % self.n_kv_heads:
      raise CheckpointError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise CheckpointError(f"head_dim={self.head_dim} must be even for RoPE")

  @property
  def q_dim(self) -> int:
    return self.n_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.n_kv_heads * self.head_dim

  @property
  def shift_logits(self) -> bool:
    """Dream's logits at position i predict token i+1; consumers shift them by one."""
    return self.arch == "dream"

  def raw_dict(self) -> dict:
    return dict(self.raw)


def _get(d: Mapping[str, Any], key: str, path: str, default: Any = dataclasses.MISSING):
  if key in d and d[key] is not None:
    return d[key]
  if default is dataclasses.MISSING:
    raise CheckpointError(f"{path}: config field {key!r} is missing; a real config.json of this model type has it")
  return default


def _freeze(v):
  if isinstance(v, dict):
    return tuple((k, _freeze(x)) for k, x in v.items())
  if isinstance(v, list):
    return tuple(_freeze(x) for x in v)
  return v


def _thaw_raw(raw):
  def thaw(v):
    if isinstance(v, tuple) and v and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in v):
      return {k: thaw(x) for k, x in v}
    if isinstance(v, tuple):
      return [thaw(x) for x in v]
    return v
  return {k: thaw(v) for k, v in raw}


def _refuse(d, path, key, bad, why):
  if key in d and d[key] == bad:
    raise CheckpointError(f"{path}: {key}={bad!r} is not supported ({why}); LLaDA/Dream checkpoints use the default")


def _llada_config(d: Mapping[str, Any], path: str) -> ModelConfig:
  _refuse(d, path, "alibi", True, "ALiBi positions")
  _refuse(d, path, "attention_layer_norm", True, "QK-norm")
  _refuse(d, path, "scale_logits", True, "logit scaling")
  _refuse(d, path, "input_emb_norm", True, "embedding norm")
  if d.get("block_type", "llama") != "llama":
    raise CheckpointError(f"{path}: block_type={d['block_type']!r} is not supported; expected 'llama'")
  if d.get("activation_type", "silu") not in ("silu", "swiglu"):
    raise CheckpointError(f"{path}: activation_type={d['activation_type']!r}; expected 'silu'")
  if d.get("layer_norm_type", "rms") != "rms":
    raise CheckpointError(f"{path}: layer_norm_type={d['layer_norm_type']!r}; expected 'rms'")
  if d.get("include_bias", False):
    raise CheckpointError(f"{path}: include_bias=true (biases on every linear) is not supported")
  d_model = int(_get(d, "d_model", path))
  n_heads = int(_get(d, "n_heads", path))
  n_kv = d.get("n_kv_heads") or (1 if d.get("multi_query_attention") else n_heads)
  mlp = d.get("mlp_hidden_size") or int(_get(d, "mlp_ratio", path) * d_model)
  vocab = int(_get(d, "vocab_size", path))
  return ModelConfig(
      arch="llada", vocab_size=int(d.get("embedding_size") or vocab), hf_vocab_size=vocab,
      d_model=d_model, n_layers=int(_get(d, "n_layers", path)), n_heads=n_heads, n_kv_heads=int(n_kv),
      head_dim=d_model // n_heads, mlp_hidden=int(mlp), rope_theta=float(d.get("rope_theta", 10000.0)),
      norm_eps=float(d.get("rms_norm_eps", 1e-5)), qkv_bias=bool(d.get("include_qkv_bias", False)),
      tie_embeddings=bool(d.get("weight_tying", False)), rope_full_precision=bool(d.get("rope_full_precision", True)),
      mask_id=d.get("mask_token_id", 126336), bos_id=d.get("bos_token_id"), eos_id=d.get("eos_token_id"),
      pad_id=d.get("pad_token_id"), max_seq_len=int(d.get("max_sequence_length", 4096)), raw=_freeze(dict(d)))


def _dream_config(d: Mapping[str, Any], path: str) -> ModelConfig:
  if d.get("use_sliding_window", False):
    raise CheckpointError(f"{path}: use_sliding_window=true is not supported (Dream uses full attention)")
  if d.get("rope_scaling"):
    raise CheckpointError(f"{path}: rope_scaling={d['rope_scaling']!r} is not supported; expected null")
  if d.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{path}: hidden_act={d['hidden_act']!r}; expected 'silu'")
  hidden = int(_get(d, "hidden_size", path))
  n_heads = int(_get(d, "num_attention_heads", path))
  return ModelConfig(
      arch="dream", vocab_size=int(_get(d, "vocab_size", path)), hf_vocab_size=int(d["vocab_size"]),
      d_model=hidden, n_layers=int(_get(d, "num_hidden_layers", path)), n_heads=n_heads,
      n_kv_heads=int(d.get("num_key_value_heads") or n_heads), head_dim=int(d.get("head_dim") or hidden // n_heads),
      mlp_hidden=int(_get(d, "intermediate_size", path)), rope_theta=float(d.get("rope_theta", 10000.0)),
      norm_eps=float(d.get("rms_norm_eps", 1e-6)), qkv_bias=True,
      tie_embeddings=bool(d.get("tie_word_embeddings", False)), rope_full_precision=False,
      mask_id=d.get("mask_token_id", 151666), bos_id=d.get("bos_token_id"), eos_id=d.get("eos_token_id"),
      pad_id=d.get("pad_token_id"), max_seq_len=int(d.get("max_position_embeddings", 2048)), raw=_freeze(dict(d)))


def config_from_hf(d: Mapping[str, Any], path: str = "config.json") -> ModelConfig:
  """Parse a Hugging Face `config.json` dict of a LLaDA (`model_type` "llada") or Dream ("Dream") model."""
  mt = d.get("model_type")
  if mt == "llada":
    return _llada_config(d, path)
  if mt in ("Dream", "dream"):
    return _dream_config(d, path)
  raise CheckpointError(
      f"{path}: unknown model_type {mt!r}; expected 'llada' (LLaDA-8B, LLaDA-1.5) or 'Dream' (Dream-v0-7B)")


def config_to_hf(cfg: ModelConfig) -> dict:
  """The config.json dict to write next to the weights: the original fields, unchanged."""
  if cfg.raw:
    return _thaw_raw(cfg.raw)
  raise CheckpointError("this ModelConfig was not parsed from a config.json; build it with llada_config/dream_config")
