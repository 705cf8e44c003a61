"""AWQ against NumPy transcriptions of llm-awq (pseudo-quantizer, scale grid, clip grid) on a tiny LLaDA."""
import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.baselines import awq
from qdllm_jax.errors import QuantizationError
from qdllm_jax.models import layers, transformer
from tests.baselines import np_ref
from tests.baselines.conftest import outlier_params


def np_pq(w, bits, g, dtype=np.float64):
  w = np.asarray(w, dtype)
  o, n = w.shape
  wg = w.reshape(o, n // g, g)
  mx = 2 ** bits - 1
  lo, hi = wg.min(-1, keepdims=True), wg.max(-1, keepdims=True)
  s = np.maximum(hi - lo, dtype(1e-5)) / dtype(mx)
  z = np.clip(-np.round(lo / s), 0, mx)
  return (s * (np.clip(np.round(wg / s) + z, 0, mx) - z)).reshape(o, n)


def test_pseudo_quantize_matches_numpy():
  w = np.random.default_rng(0).normal(size=(6, 32)).astype(np.float32)
  for bits, g in ((3, 8), (4, 16), (4, -1)):
    np.testing.assert_allclose(np.asarray(awq.pseudo_quantize(jnp.asarray(w), bits, g)),
                               np_pq(w, bits, 32 if g == -1 else g), atol=1e-6)


def _rope_tables(cfg, b, t):
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return layers.rope_tables(pos, cfg.head_dim, cfg.rope_theta)


def test_scale_search_matches_numpy_bruteforce(cfg, ids):
  params = outlier_params(cfg, seed=1)
  p = params["blocks"][0]
  taps = []
  np_ref.forward(dict(params, blocks=[p]), cfg, ids, hook=lambda x: taps.append(x) or x)
  cos, sin = _rope_tables(cfg, *ids.shape)
  for name, k in (("o", 1), ("gate_up", 2)):
    h = taps[k]
    losses, s_x = awq.scale_search(p, jnp.asarray(h, jnp.float32), cos, sin, name=name, cfg=cfg, bits=3,
                                   group_size=8, n_grid=20)
    sx = np.abs(h.reshape(-1, h.shape[-1])).mean(0)
    np.testing.assert_allclose(np.asarray(s_x), sx, rtol=1e-5)
    P = {n: np.asarray(p[n], np.float64) for n in ("o", "gate", "up", "down")}

    def f(ws):
      if name == "o":
        return h @ ws[0].T
      g = h @ ws[0].T
      return (g / (1 + np.exp(-g)) * (h @ ws[1].T)) @ P["down"].T

    ws = [P["o"]] if name == "o" else [P["gate"], P["up"]]
    org = f(ws)
    want = []
    for i in range(20):
      s = np.maximum(sx ** (i / 20), 1e-4)
      s = s / np.sqrt(s.max() * s.min())
      want.append(np.mean((org - f([np_pq(w * s, 3, 8) / s for w in ws])) ** 2))
    want = np.array(want)
    np.testing.assert_allclose(np.asarray(losses), want, rtol=2e-3, atol=1e-9)
    assert want.argmin() > 0 and want.min() < 0.9 * want[0]  # scaling helps on the outlier channel


def test_clip_search_matches_numpy_bruteforce():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(4, 16)).astype(np.float32)
  w[:, 5] *= 6.0  # an outlier weight makes clipping worth it
  x = rng.normal(size=(64, 16)).astype(np.float32)
  m, errs = awq.clip_search(jnp.asarray(w), jnp.asarray(x), bits=3, group_size=8)
  wg = w.reshape(4, 2, 8)
  xg = x.astype(np.float64).reshape(64, 2, 8)
  org = np.einsum("tgk,ogk->otg", xg, wg)
  amax = np.abs(wg).max(-1)
  e = []
  for i in range(10):
    mi = amax * np.float32(1 - i / 20)
    # clamping to +-m puts the row ends exactly on rounding ties (+-3.5 steps) that any float arithmetic
    # resolves arbitrarily, so the quantizer here is the code's (checked against NumPy off ties above)
    c = np.clip(wg, -mi[..., None], mi[..., None]).reshape(4, 16)
    q = np.asarray(awq.pseudo_quantize(jnp.asarray(c), 3, 8), np.float64).reshape(4, 2, 8)
    e.append(((np.einsum("tgk,ogk->otg", xg, q) - org) ** 2).mean(1))
  e = np.array(e)
  np.testing.assert_allclose(np.asarray(errs), e, rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose(np.asarray(m), amax * (1 - e.argmin(0) / 20), rtol=1e-6)
  assert (e.argmin(0) > 0).any()


def test_fold_scales_preserves_fp_function(cfg, ids):
  params = outlier_params(cfg, seed=2)
  rng = np.random.default_rng(0)
  blocks = []
  for p in params["blocks"]:
    sc = {"qkv": rng.uniform(0.3, 3, cfg.d_model), "o": rng.uniform(0.3, 3, cfg.q_dim),
          "gate_up": rng.uniform(0.3, 3, cfg.d_model), "down": rng.uniform(0.3, 3, cfg.mlp_hidden)}
    blocks.append(awq.fold_scales(p, {k: jnp.asarray(v, jnp.float32) for k, v in sc.items()}))
  folded = dict(params, blocks=blocks)
  ref = np_ref.forward(params, cfg, ids)
  got = np.asarray(transformer.forward(folded, cfg, jnp.asarray(ids)))
  assert np.abs(np.asarray(blocks[0]["q"]) - np.asarray(params["blocks"][0]["q"])).max() > 1e-3
  np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max())


def test_awq_beats_rtn_on_outlier_channel(cfg, ids):
  params = outlier_params(cfg, seed=4)
  qa, ratios = awq.awq(params, cfg, ids, w_bits=3, group_size=8)
  assert ratios[0]["qkv"] > 0 and set(ratios[0]) == {"qkv", "o", "gate_up", "down"}
  rtn = dict(params, blocks=[dict(p, **{n: awq.pseudo_quantize(p[n], 3, 8) for n in transformer.LINEARS})
                             for p in params["blocks"]])
  ref = np_ref.forward(params, cfg, ids)
  x = jnp.asarray(ids)
  e_awq = float(np.mean((np.asarray(transformer.forward(qa, cfg, x)) - ref) ** 2))
  e_rtn = float(np.mean((np.asarray(transformer.forward(rtn, cfg, x)) - ref) ** 2))
  assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
  # the first block's output error as well (the layer-level criterion AWQ optimises)
  b, t = ids.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cos, sin = layers.rope_tables(pos, cfg.head_dim, cfg.rope_theta)
  x0 = transformer.embed(params, x)
  y = transformer.block_forward(params["blocks"][0], x0, cfg, cos, sin)
  err = lambda p: float(jnp.mean((transformer.block_forward(p, x0, cfg, cos, sin) - y) ** 2))
  assert err(qa["blocks"][0]) < err(rtn["blocks"][0])


def test_awq_bad_group_size(cfg, ids):
  with pytest.raises(QuantizationError, match="group_size"):
    awq.awq(outlier_params(cfg), cfg, ids, w_bits=4, group_size=12)
