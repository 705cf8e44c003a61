"""The LLaDA family (LLaDA-8B-Base/Instruct, LLaDA-1.5 share one architecture): config.json parsing, tensor
names, and the shared pre-norm decoder of models/transformer.py.

`llada_hf_config(**overrides)` returns the dict the real checkpoint ships (GSAI-ML/LLaDA-8B-Base config.json);
`llada_config(**overrides)` parses it into a `ModelConfig`.
"""
from __future__ import annotations

from typing import Any, Mapping

from qdllm_jax.errors import CheckpointError
from qdllm_jax.models import transformer
from qdllm_jax.models.family import Family
from qdllm_jax.models.model_config import ModelConfig, freeze, get_field, refuse_value

LLADA_8B = {
    "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 4096, "n_heads": 32,
    "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288, "mlp_ratio": 4, "vocab_size": 126464,
    "embedding_size": 126464, "rope": True, "rope_theta": 500000.0, "rope_full_precision": True,
    "rms_norm_eps": 1e-5, "layer_norm_type": "rms", "include_bias": False, "include_qkv_bias": False,
    "weight_tying": False, "block_type": "llama", "activation_type": "silu", "alibi": False,
    "attention_layer_norm": False, "scale_logits": False, "input_emb_norm": False,
    "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081,
    "bos_token_id": 126080, "use_cache": False, "torch_dtype": "bfloat16"}

LLADA_TINY_TEST = dict(LLADA_8B, d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=64,
                       vocab_size=128, embedding_size=128, rope_theta=5e5, mask_token_id=120,
                       eos_token_id=121, pad_token_id=121, bos_token_id=122, max_sequence_length=256)


BLOCK_NAMES = {"attn_norm": "attn_norm.weight", "q": "q_proj.weight", "k": "k_proj.weight",
               "v": "v_proj.weight", "o": "attn_out.weight", "ff_norm": "ff_norm.weight",
               "gate": "ff_proj.weight", "up": "up_proj.weight", "down": "ff_out.weight",
               "q_bias": "q_proj.bias", "k_bias": "k_proj.bias", "v_bias": "v_proj.bias"}
TOP_NAMES = {"embed": "model.transformer.wte.weight", "final_norm": "model.transformer.ln_f.weight",
             "head": "model.transformer.ff_out.weight"}
BLOCK_PREFIX = "model.transformer.blocks.{}."


def _llada_config(d: Mapping[str, Any], path: str) -> ModelConfig:
  refuse_value(d, path, "alibi", True, "ALiBi positions")
  refuse_value(d, path, "attention_layer_norm", True, "QK-norm")
  refuse_value(d, path, "scale_logits", True, "logit scaling")
  refuse_value(d, path, "input_emb_norm", True, "embedding norm")
  if d.get("block_type", "llama") != "llama":
    raise CheckpointError(f"{path}: block_type={d['block_type']!r} is not supported; expected 'llama'")
  if d.get("activation_type", "silu") not in ("silu", "swiglu"):
    raise CheckpointError(f"{path}: activation_type={d['activation_type']!r}; expected 'silu'")
  if d.get("layer_norm_type", "rms") != "rms":
    raise CheckpointError(f"{path}: layer_norm_type={d['layer_norm_type']!r}; expected 'rms'")
  if d.get("include_bias", False):
    raise CheckpointError(f"{path}: include_bias=true (biases on every linear) is not supported")
  d_model = int(get_field(d, "d_model", path))
  n_heads = int(get_field(d, "n_heads", path))
  n_kv = d.get("n_kv_heads") or (1 if d.get("multi_query_attention") else n_heads)
  mlp = d.get("mlp_hidden_size") or int(get_field(d, "mlp_ratio", path) * d_model)
  vocab = int(get_field(d, "vocab_size", path))
  return ModelConfig(
      arch="llada", vocab_size=int(d.get("embedding_size") or vocab), hf_vocab_size=vocab,
      d_model=d_model, n_layers=int(get_field(d, "n_layers", path)), n_heads=n_heads, n_kv_heads=int(n_kv),
      head_dim=d_model // n_heads, mlp_hidden=int(mlp), rope_theta=float(d.get("rope_theta", 10000.0)),
      norm_eps=float(d.get("rms_norm_eps", 1e-5)), qkv_bias=bool(d.get("include_qkv_bias", False)),
      tie_embeddings=bool(d.get("weight_tying", False)), rope_full_precision=bool(d.get("rope_full_precision", True)),
      mask_id=d.get("mask_token_id", 126336), bos_id=d.get("bos_token_id"), eos_id=d.get("eos_token_id"),
      pad_id=d.get("pad_token_id"), max_seq_len=int(d.get("max_sequence_length", 4096)), raw=freeze(dict(d)))


def decoder_top_names(top: dict):
  """top_names of a pre-norm decoder family with the table `top` (the head dropped when tied)."""
  def names(cfg: ModelConfig) -> dict[str, str]:
    return {k: v for k, v in top.items() if not (k == "head" and cfg.tie_embeddings)}
  return names


def decoder_block_names(table: dict, prefix: str):
  """block_names of a pre-norm decoder family: `prefix.format(layer)` + table entry (q/k/v biases if any)."""
  def names(cfg: ModelConfig, layer: int) -> dict[str, str]:
    p = prefix.format(layer)
    return {k: p + v for k, v in table.items() if cfg.qkv_bias or not k.endswith("_bias")}
  return names


# the pre-norm decoder's exact scale folds (llm-awq's LLaMA mapping): RMSNorm weights before q/k/v and gate/up,
# v's rows before o (only when q_dim == kv_dim; AWQ skips it under GQA), up's rows before down (SwiGLU)
DECODER_SCALE_FOLDS = {"qkv": "attn_norm", "o": "v", "gate_up": "ff_norm", "down": "up"}
# the published LLaDA runner's order: singleton groups attn_out, ff_out, q, k, v, ff_proj, up_proj (Quant-dLLM §6)
DECODER_MODULE_ORDERS = {"llada_runner": (("o",), ("down",), ("q",), ("k",), ("v",), ("gate",), ("up",))}


def decoder_family(name: str, model_types: tuple, parse_config, top: dict, table: dict, prefix: str,
                   calib_seed: int, presets: dict, sampler: str, description: str) -> Family:
  """A Family on the shared pre-norm decoder (transformer.py) with its own names, config parser and sampler."""
  return Family(
      name=name, model_types=model_types, parse_config=parse_config, top_names=decoder_top_names(top),
      block_names=decoder_block_names(table, prefix), param_shapes=transformer.param_shapes,
      param_axes=transformer.PARAM_AXES,
      linear_groups=transformer.LINEAR_GROUPS, upstream=transformer.UPSTREAM, embed_keys=("embed",),
      embed=transformer.embed, block_context=transformer.block_context, block_forward=transformer.block_forward_ctx,
      head=transformer.head, forward=transformer.forward, calib_seed=calib_seed, norm_kind="rms_pre",
      scale_folds=DECODER_SCALE_FOLDS, module_orders=DECODER_MODULE_ORDERS, presets=presets,
      sampler=sampler, description=description)


def llada_hf_config(base: dict = LLADA_8B, **overrides) -> dict:
  return dict(base, **overrides)


def llada_config(base: dict = LLADA_8B, **overrides) -> ModelConfig:
  return _llada_config(llada_hf_config(base, **overrides), "config.json")


PRESETS = {
    "llada_8b": llada_config(LLADA_8B),
    # the shipped tiny LLaDA (scripts/make_tiny_model.py's architecture with the shipped tokenizer's ids)
    "tiny_llada": llada_config(LLADA_8B, d_model=256, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=1024,
                               max_sequence_length=256, vocab_size=2048, embedding_size=2048, mask_token_id=2,
                               eos_token_id=0, pad_token_id=0, bos_token_id=1, torch_dtype="float32")}
# seed_x 0: the released LLaDA calibration script's default
FAMILY = decoder_family("llada", ("llada",), _llada_config, TOP_NAMES, BLOCK_NAMES, BLOCK_PREFIX, calib_seed=0,
                        presets=PRESETS, sampler="llada", description="LLaDA-8B-Base/Instruct, LLaDA-1.5")
