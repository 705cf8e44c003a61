"""The shared LLaDA/Dream (pre-norm decoder) forward pass as pure functions over a params pytree.

Params pytree (canonical names; HF names are mapped in models/hf.py). All linears are `[out, in]`:
  {"embed": [V, D],
   "blocks": [ {"attn_norm": [D], "q": [Hq*d, D], "k": [Hkv*d, D], "v": [Hkv*d, D], "o": [D, Hq*d],
                "ff_norm": [D], "gate": [F, D], "up": [F, D], "down": [D, F],
                ("q_bias": [Hq*d], "k_bias": [Hkv*d], "v_bias": [Hkv*d])  # Dream / include_qkv_bias
                ("online": {tap: [C, C] or [C]})  # online input transforms (QuaRot, DuQuant: matrices; AWQ: vectors)
               } x n_layers ],
   "final_norm": [D],
   "head": [V, D]}          # absent when tie_embeddings

`block_forward` is usable on its own: calibration runs one block at a time and asks for its `taps`,
the inputs of every linear group:
  "qkv": input of q/k/v  [B, T, D]      "o":    input of o     [B, T, Hq*d]
  "gate_up": input of gate/up [B, T, D] "down": input of down  [B, T, F]
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qdllm_jax.models import act_fake_quant, layers
from qdllm_jax.models.model_config import ModelConfig

# Linear layers of a block, in canonical names, grouped by the activation they read.
LINEAR_GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
LINEARS = tuple(n for g in LINEAR_GROUPS.values() for n in g)
TAP_OF = {n: g for g, names in LINEAR_GROUPS.items() for n in names}
# Linears whose quantization changes each tap's activations (within one block).
UPSTREAM = {"qkv": (), "o": ("q", "k", "v"), "gate_up": ("q", "k", "v", "o"),
            "down": ("q", "k", "v", "o", "gate", "up")}
# Logical axes of each param (weights are [out, in]; sharding.LOGICAL_RULES maps them to mesh axes).
PARAM_AXES = {
    "embed": ("vocab", "embed"), "head": ("vocab", "embed"), "final_norm": ("embed",),
    "attn_norm": ("embed",), "ff_norm": ("embed",),
    "q": ("heads", "embed"), "k": ("kv", "embed"), "v": ("kv", "embed"), "o": ("embed", "heads"),
    "q_bias": ("heads",), "k_bias": ("kv",), "v_bias": ("kv",),
    "gate": ("mlp", "embed"), "up": ("mlp", "embed"), "down": ("embed", "mlp")}


def positions_and_mask(cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None):
  """RoPE positions [B, T] and key mask [B, T] (bool or None).

  LLaDA always uses 0..T-1. Dream (`cfg.positions_skip_padding`) uses cumsum(mask) - 1 (1 at padding) when a
  mask is given.
  """
  b, t = input_ids.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if attention_mask is None:
    return pos, None
  m = attention_mask.astype(bool)
  if cfg.positions_skip_padding:
    pos = jnp.where(m, jnp.cumsum(m.astype(jnp.int32), axis=-1) - 1, 1)
  return pos, m


def block_context(cfg: ModelConfig, batch: int, seqlen: int, attention_mask: jax.Array | None = None):
  """What every block reads besides x: (cos, sin float32 [B, T, head_dim], key mask bool [B, T] or None)."""
  pos, key_mask = positions_and_mask(cfg, jnp.zeros((batch, seqlen), jnp.int32), attention_mask)
  cos, sin = layers.rope_tables(pos, cfg.head_dim, cfg.rope_theta)
  return cos, sin, key_mask


def block_forward_ctx(p: dict, x: jax.Array, cfg: ModelConfig, ctx: tuple, return_taps: bool = False, act=None):
  """`block_forward` with the (cos, sin, key_mask) of `block_context` (the family block interface)."""
  cos, sin, key_mask = ctx
  return block_forward(p, x, cfg, cos, sin, key_mask, return_taps=return_taps, act=act)


def block_forward(p: dict, x: jax.Array, cfg: ModelConfig, cos: jax.Array, sin: jax.Array,
                  key_mask: jax.Array | None = None, return_taps: bool = False, act=None):
  """One pre-norm block: x += o(attn(rope(q), rope(k), v)); x += down(silu(gate h) * up h).

  Each linear group reads its input through  a -> Q(a M_tap)  with M_tap = p["online"][tap] (an online
  transform: [C, C] QuaRot/DuQuant, or a vector r [C] meaning diag(r), AWQ) where present, else I, and
  Q = `act` (per-token activation fake quantization, models/act_fake_quant.py), else the identity. A plain FP
  block has neither.
  Args:
    p: the block's params (see module docstring); linears may be QuantizedWeight.
    x: [B, T, D] residual stream (param dtype).
    cos, sin: float32 [B, T, head_dim] from `layers.rope_tables`.
    key_mask: optional bool [B, T].
    return_taps: also return the dict of linear-group inputs (after M_tap, before Q).
    act: optional `act_fake_quant.ActQuant` (static).
  Returns:
    x_out [B, T, D] (and taps).
  """
  read, taps = act_fake_quant.tap_reader(p, act)

  b, t, _ = x.shape
  h = read("qkv", layers.rms_norm(x, p["attn_norm"], cfg.norm_eps))
  q = layers.linear(h, p["q"], p.get("q_bias")).reshape(b, t, cfg.n_heads, cfg.head_dim)
  k = layers.linear(h, p["k"], p.get("k_bias")).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
  v = layers.linear(h, p["v"], p.get("v_bias")).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
  q = layers.apply_rope(q, cos, sin, cfg.rope_full_precision)
  k = layers.apply_rope(k, cos, sin, cfg.rope_full_precision)
  a = layers.attention(q, k, v, key_mask).reshape(b, t, cfg.q_dim)
  x = x + layers.linear(read("o", a), p["o"])
  h2 = read("gate_up", layers.rms_norm(x, p["ff_norm"], cfg.norm_eps))
  act_in = jax.nn.silu(layers.linear(h2, p["gate"])) * layers.linear(h2, p["up"])
  x = x + layers.linear(read("down", act_in), p["down"])
  if return_taps:
    return x, taps
  return x


def embed(params: dict, input_ids: jax.Array, cfg: ModelConfig | None = None) -> jax.Array:
  """x = Embed[ids]: [B, T] int32 -> [B, T, D]. (cfg is unused: the family embed interface.)"""
  return jnp.take(params["embed"], input_ids, axis=0)


def head(params: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
  """logits = RMSNorm(x) W_head^T, float32 [B, T, V]."""
  h = layers.rms_norm(x, params["final_norm"], cfg.norm_eps)
  w = params["embed"] if cfg.tie_embeddings else params["head"]
  return layers.linear(h, w).astype(jnp.float32)


def forward(params: dict, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            act=None):
  """Full model: int32 [B, T] -> float32 logits [B, T, V] (Dream: raw, unshifted).

  act: optional ActQuant (static) quantizing every block linear's input per token (W-A models).
  """
  pos, key_mask = positions_and_mask(cfg, input_ids, attention_mask)
  cos, sin = layers.rope_tables(pos, cfg.head_dim, cfg.rope_theta)
  x = embed(params, input_ids)
  for p in params["blocks"]:
    x = block_forward(p, x, cfg, cos, sin, key_mask, act=act)
  return head(params, cfg, x)


forward_jit = jax.jit(forward, static_argnames=("cfg", "act"))


def param_shapes(cfg: ModelConfig) -> dict:
  """The params pytree's shapes as nested dicts of tuples (the single source of truth for validation)."""
  blk = {"attn_norm": (cfg.d_model,), "q": (cfg.q_dim, cfg.d_model), "k": (cfg.kv_dim, cfg.d_model),
         "v": (cfg.kv_dim, cfg.d_model), "o": (cfg.d_model, cfg.q_dim), "ff_norm": (cfg.d_model,),
         "gate": (cfg.mlp_hidden, cfg.d_model), "up": (cfg.mlp_hidden, cfg.d_model),
         "down": (cfg.d_model, cfg.mlp_hidden)}
  if cfg.qkv_bias:
    blk.update(q_bias=(cfg.q_dim,), k_bias=(cfg.kv_dim,), v_bias=(cfg.kv_dim,))
  shapes = {"embed": (cfg.vocab_size, cfg.d_model), "blocks": [dict(blk) for _ in range(cfg.n_layers)],
            "final_norm": (cfg.d_model,)}
  if not cfg.tie_embeddings:
    shapes["head"] = (cfg.vocab_size, cfg.d_model)
  return shapes


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
  """Random params: N(0, std^2) matrices, ones for norms, zeros for biases (for tests and training)."""
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      shapes, is_leaf=lambda s: isinstance(s, tuple))[0]]
  out = []
  for i, (path, shape) in enumerate(zip(paths, leaves)):
    if "norm" in path:
      out.append(jnp.ones(shape, dtype))
    elif "bias" in path:
      out.append(jnp.zeros(shape, dtype))
    else:
      out.append((std * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def num_params(cfg: ModelConfig) -> int:
  """Parameter count from shapes alone (no allocation)."""
  leaves = jax.tree_util.tree_leaves(param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
  return int(sum(functools.reduce(lambda a, b: a * b, s, 1) for s in leaves))
