"""The JAX forward against a direct NumPy (float64) transcription of the released modeling code's equations
(modeling_llada.py, modeling_dream.py), the checkpoints' tensor names and their parameter counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.models import hf, layers, transformer
from qdllm_jax.models.dream import dream_config
from qdllm_jax.models.llada import llada_config


# ---- NumPy reference (float64), written from the equations, not from the JAX code --------------------------
def np_rms(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def np_rope_pairs(x, pos, theta):
  """Rotate the pair (x_i, x_{i+d/2}) by angle pos * theta^(-2i/d): the half-split layout, written per pair."""
  d = x.shape[-1]
  out = np.empty_like(x)
  for i in range(d // 2):
    ang = pos[:, :, None] * theta ** (-2.0 * i / d)  # [B, T, 1]
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., i], x[..., i + d // 2]
    out[..., i] = a * c - b * s
    out[..., i + d // 2] = b * c + a * s
  return out


def np_block(p, x, cfg, pos, key_mask):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  b, t, _ = x.shape
  h = np_rms(x, p["attn_norm"], cfg.norm_eps)
  q = h @ p["q"].T + p.get("q_bias", 0.0)
  k = h @ p["k"].T + p.get("k_bias", 0.0)
  v = h @ p["v"].T + p.get("v_bias", 0.0)
  q = np_rope_pairs(q.reshape(b, t, cfg.n_heads, cfg.head_dim), pos, cfg.rope_theta)
  k = np_rope_pairs(k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim), pos, cfg.rope_theta)
  v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
  rep = cfg.n_heads // cfg.n_kv_heads  # GQA: query head h reads kv head h // rep (HF repeat_kv)
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)  # no causal mask
  if key_mask is not None:
    s = np.where(key_mask[:, None, None, :], s, -np.inf)
  s = np.exp(s - s.max(-1, keepdims=True))
  a = np.einsum("bhqk,bkhd->bqhd", s / s.sum(-1, keepdims=True), v).reshape(b, t, cfg.q_dim)
  x = x + a @ p["o"].T
  h2 = np_rms(x, p["ff_norm"], cfg.norm_eps)
  g = h2 @ p["gate"].T
  return x + ((g / (1 + np.exp(-g))) * (h2 @ p["up"].T)) @ p["down"].T


def np_forward(params, cfg, ids, mask):
  b, t = ids.shape
  pos = np.broadcast_to(np.arange(t), (b, t)).astype(np.float64)
  if mask is not None and cfg.arch == "dream":
    pos = np.where(mask, np.cumsum(mask, -1) - 1, 1).astype(np.float64)
  x = np.asarray(params["embed"], np.float64)[ids]
  for p in params["blocks"]:
    x = np_block(p, x, cfg, pos, mask)
  return np_rms(x, np.asarray(params["final_norm"], np.float64), cfg.norm_eps) @ np.asarray(params["head"]).T


def _ids_and_mask(cfg, b=2, t=10, pad=3, seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[1, :pad] = False  # left padding in row 1
  return ids, mask


def test_rope_matches_pairwise_rotation():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)
  for hi, tol in ((300, 5e-5), (4096, 2e-3)):  # f32 angles: error ~ pos * 2^-24, as in the originals
    pos = rng.integers(0, hi, (2, 5))
    cos, sin = layers.rope_tables(jnp.asarray(pos), 16, 5e5)
    for full in (True, False):
      got = np.asarray(layers.apply_rope(jnp.asarray(x), cos, sin, full))
      np.testing.assert_allclose(got, np_rope_pairs(x.astype(np.float64), pos.astype(np.float64), 5e5),
                                 atol=tol, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32) for _ in range(2))

  def score(pq, pk):
    cq, sq = layers.rope_tables(jnp.array([[pq]]), 8, 1e4)
    ck, sk = layers.rope_tables(jnp.array([[pk]]), 8, 1e4)
    return float(jnp.sum(layers.apply_rope(q, cq, sq, True) * layers.apply_rope(k, ck, sk, True)))

  assert abs(score(7, 3) - score(104, 100)) < 1e-4
  assert abs(score(7, 3) - score(3, 7)) > 1e-3  # and it does depend on the offset


def test_rms_norm_float32_then_weight():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3, 32)).astype(np.float32) * 5
  w = (1 + 0.1 * rng.standard_normal(32)).astype(np.float32)
  got = np.asarray(layers.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5))
  np.testing.assert_allclose(got, np_rms(x.astype(np.float64), w, 1e-5), rtol=1e-5, atol=1e-6)
  # bf16 input: normalised in f32, cast to bf16, THEN multiplied by the (bf16) weight
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  x32 = np.asarray(xb, np.float32)
  y = (x32 / np.sqrt(np.mean(x32 * x32, -1, keepdims=True) + 1e-5)).astype(jnp.bfloat16)
  want = (np.asarray(wb, np.float32) * np.asarray(y, np.float32)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(layers.rms_norm(xb, wb, 1e-5)).view(np.uint16), want.view(np.uint16))


def test_block_matches_numpy(tiny_cfg, make_params):
  cfg = tiny_cfg
  params = make_params(cfg, seed=3)
  ids, mask = _ids_and_mask(cfg)
  x = np.random.default_rng(4).standard_normal((2, 10, cfg.d_model)).astype(np.float32)
  pos, key_mask = transformer.positions_and_mask(cfg, jnp.asarray(ids), jnp.asarray(mask))
  cos, sin = layers.rope_tables(pos, cfg.head_dim, cfg.rope_theta)
  p = jax.tree.map(jnp.asarray, params["blocks"][0])
  got, taps = transformer.block_forward(p, jnp.asarray(x), cfg, cos, sin, key_mask, return_taps=True)
  want = np_block(params["blocks"][0], x.astype(np.float64), cfg, np.asarray(pos, np.float64), mask)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(taps["qkv"]), np_rms(x, params["blocks"][0]["attn_norm"], cfg.norm_eps),
                             atol=1e-5, rtol=1e-5)
  assert taps["o"].shape == (2, 10, cfg.q_dim) and taps["down"].shape == (2, 10, cfg.mlp_hidden)


@pytest.mark.parametrize("use_mask", [False, True])
def test_forward_matches_numpy(tiny_cfg, make_params, use_mask):
  cfg = tiny_cfg
  params = make_params(cfg, seed=5)
  ids, mask = _ids_and_mask(cfg)
  mask = mask if use_mask else None
  got = np.asarray(transformer.forward(jax.tree.map(jnp.asarray, params), cfg, jnp.asarray(ids),
                                       None if mask is None else jnp.asarray(mask)))
  want = np_forward(params, cfg, ids, mask)
  rows = mask if mask is not None else np.ones(ids.shape, bool)
  np.testing.assert_allclose(got[rows], want[rows], atol=1e-4, rtol=1e-4)
  # the mask matters: without it row 1's real positions attend to the padding and change
  if use_mask:
    unmasked = np_forward(params, cfg, ids, None)
    assert np.abs(unmasked[1][mask[1]] - want[1][mask[1]]).max() > 1e-3


# ---- §2 name/shape tables and §1 parameter counts, transcribed from the reference --------------------------
def reference_tensors(arch):
  if arch == "llada":
    d, f, v, layers_, pre = 4096, 12288, 126464, 32, "model.transformer.blocks.{}."
    top = {"model.transformer.wte.weight": (v, d), "model.transformer.ln_f.weight": (d,),
           "model.transformer.ff_out.weight": (v, d)}
    blk = {"attn_norm.weight": (d,), "q_proj.weight": (d, d), "k_proj.weight": (d, d), "v_proj.weight": (d, d),
           "attn_out.weight": (d, d), "ff_norm.weight": (d,), "ff_proj.weight": (f, d), "up_proj.weight": (f, d),
           "ff_out.weight": (d, f)}
  else:
    d, f, v, kv, layers_, pre = 3584, 18944, 152064, 512, 28, "model.layers.{}."
    top = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    blk = {"input_layernorm.weight": (d,), "self_attn.q_proj.weight": (d, d), "self_attn.q_proj.bias": (d,),
           "self_attn.k_proj.weight": (kv, d), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.weight": (kv, d),
           "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.weight": (d, d),
           "post_attention_layernorm.weight": (d,), "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
           "mlp.down_proj.weight": (d, f)}
  out = dict(top)
  for n in range(layers_):
    out.update({pre.format(n) + k: s for k, s in blk.items()})
  return out


@pytest.mark.parametrize("arch_name, n_tensors", [("llada", 291), ("dream", 339)])
def test_hf_names_and_shapes_match_reference(arch_name, n_tensors):
  cfg = llada_config() if arch_name == "llada" else dream_config()
  ref = reference_tensors(arch_name)
  shapes = transformer.param_shapes(cfg)
  ours = {}
  for name, path in hf.all_names(cfg).items():
    ours[name] = shapes[path[0]] if len(path) == 1 else shapes["blocks"][path[1]][path[2]]
  assert len(ref) == n_tensors
  assert ours == ref


@pytest.mark.parametrize("arch_name", ["llada", "dream"])
def test_param_count_full_size_without_allocation(arch_name):
  cfg = llada_config() if arch_name == "llada" else dream_config()
  abstract = jax.eval_shape(lambda k: transformer.init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  ref = sum(int(np.prod(s)) for s in reference_tensors(arch_name).values())
  expected = {"llada": 8_015_581_184, "dream": 7_615_616_512}[arch_name]
  assert count == ref == expected == transformer.num_params(cfg)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(abstract))
