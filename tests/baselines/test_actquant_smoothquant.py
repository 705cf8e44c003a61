"""Activation fake quantization and SmoothQuant against NumPy references on a tiny LLaDA."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.baselines import smoothquant, weight_activation
from qdllm_jax.errors import QuantizationError
from qdllm_jax.models import transformer
from tests.baselines import np_ref
from tests.baselines.conftest import outlier_params


@pytest.mark.parametrize("bits,sym,clip", [(8, False, 1.0), (4, False, 1.0), (4, True, 1.0), (8, True, 1.0),
                                           (4, False, 0.9), (4, True, 0.9)])
def test_fake_quant_per_token_matches_numpy(bits, sym, clip):
  x = np.random.default_rng(0).normal(size=(3, 5, 24)).astype(np.float32)
  x[..., 2] *= 40.0
  got = np.asarray(weight_activation.fake_quant_per_token(jnp.asarray(x), bits, sym, clip))
  want = np_ref.fq_token(x, bits, sym, clip)
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(x).max())
  if clip < 1.0:
    return
  # at most 2^bits distinct levels per token, and the error is within half a step
  assert all(len(np.unique(r)) <= 2 ** bits for r in got.reshape(-1, 24))
  step = (x.max(-1) - x.min(-1)) / (2 ** bits - 1) if not sym else np.abs(x).max(-1) / (2 ** (bits - 1) - 1)
  assert np.all(np.abs(got - x).max(-1) <= 0.5 * step * (1 + 1e-4) + 1e-6)


def test_forward_actquant_matches_numpy(cfg, ids):
  params = outlier_params(cfg, seed=1)
  fp = np.asarray(weight_activation.forward_actquant(params, cfg, jnp.asarray(ids), None))
  np.testing.assert_allclose(fp, np.asarray(transformer.forward(params, cfg, jnp.asarray(ids))), atol=1e-5)
  np.testing.assert_allclose(fp, np_ref.forward(params, cfg, ids), atol=2e-4)
  got = np.asarray(weight_activation.forward_actquant(params, cfg, jnp.asarray(ids), 4))
  want = np_ref.forward(params, cfg, ids, hook=lambda x: np_ref.fq_token(x, 4))
  assert np.abs(got - fp).max() > 1e-2  # the quantizer does act
  np.testing.assert_allclose(got, want, atol=5e-3)


def test_fake_quant_weights_matches_numpy(cfg):
  params = outlier_params(cfg, seed=2)
  for sym in (False, True):
    q = weight_activation.fake_quant_weights(params, 4, group_size=-1, sym=sym)
    for n in ("q", "o", "down"):
      w = np.asarray(params["blocks"][1][n], np.float64)
      got, want = np.asarray(q["blocks"][1][n]), np_ref.rtn_channel(w, 4, sym)
      # symmetric grids put the row's extreme exactly on a rounding tie (-7.5 steps): skip ties
      step = np.abs(w).max(1, keepdims=True) * 2 / 15 if sym else 1.0
      tie = np.abs(np.abs(w / step) % 1 - 0.5) < 1e-4 if sym else np.zeros(w.shape, bool)
      np.testing.assert_allclose(got[~tie], want[~tie], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(q["embed"]), np.asarray(params["embed"]))


def test_bad_bits_raise(cfg, ids):
  with pytest.raises(QuantizationError, match="a_bits"):
    weight_activation.forward_actquant(outlier_params(cfg), cfg, jnp.asarray(ids), 1)
  with pytest.raises(QuantizationError, match="w_bits"):
    weight_activation.fake_quant_weights(outlier_params(cfg), 0)
  with pytest.raises(QuantizationError, match="alpha"):
    smoothquant.smooth_scales(jnp.ones(4), [jnp.ones((2, 4))], alpha=1.5)
  with pytest.raises(QuantizationError, match="calib_ids"):
    smoothquant.collect_act_absmax(outlier_params(cfg), cfg, np.zeros((2, 3), np.float32))


def test_absmax_and_scales_match_numpy(cfg, ids):
  params = outlier_params(cfg, seed=3)
  st = smoothquant.collect_act_absmax(params, cfg, ids, batch_size=3)  # 2 batches (3 + 1)
  taps = []
  np_ref.forward(params, cfg, ids, hook=lambda x: taps.append(x) or x)
  for li in range(cfg.n_layers):
    for k, g in enumerate(("qkv", "o", "gate_up", "down")):
      np.testing.assert_allclose(np.asarray(st[li][g]), np.abs(taps[4 * li + k]).max((0, 1)), rtol=1e-4, atol=1e-6)
  p = params["blocks"][0]
  w = np.concatenate([np.asarray(p[n], np.float64) for n in ("q", "k", "v")])
  a = np.asarray(st[0]["qkv"], np.float64)
  want = np.sqrt(a) / np.sqrt(np.abs(w).max(0))
  np.testing.assert_allclose(np.asarray(smoothquant.smooth_scales(st[0]["qkv"], [p["q"], p["k"], p["v"]])), want,
                             rtol=1e-5)


@pytest.mark.parametrize("gqa", [False, True])
def test_smoothing_preserves_fp_function(cfg, ids, gqa):
  """norm -> q/k/v, norm -> gate/up and v -> o (GQA: a kv channel's scale shared by its query heads)."""
  if gqa:
    cfg = dataclasses.replace(cfg, n_kv_heads=cfg.n_heads // 2)
  params = outlier_params(cfg, seed=4)
  sm, scales = smoothquant.smooth_params(params, smoothquant.collect_act_absmax(params, cfg, ids), 0.5, cfg)
  assert float(jnp.max(scales[0]["qkv"]) / jnp.min(scales[0]["qkv"])) > 3.0  # non-trivial scales
  assert scales[0]["o"].shape == (cfg.n_kv_heads * cfg.head_dim,) and float(jnp.std(scales[0]["o"])) > 0
  a = np.asarray(transformer.forward(params, cfg, jnp.asarray(ids)))
  b = np.asarray(transformer.forward(sm, cfg, jnp.asarray(ids)))
  np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())
  # and the smoothed qkv input has a flatter channel profile (outlier channel tamed)
  st = smoothquant.collect_act_absmax(sm, cfg, ids)
  st0 = smoothquant.collect_act_absmax(params, cfg, ids)
  ratio = lambda v: float(jnp.max(v) / jnp.median(v))
  assert ratio(st[0]["qkv"]) < ratio(st0[0]["qkv"]) / 3


@pytest.mark.parametrize("bits", [8, 4])
def test_smoothquant_beats_plain_rtn_on_outliers(cfg, ids, bits):
  params = outlier_params(cfg, seed=5)
  x = jnp.asarray(ids)
  ref = np_ref.forward(params, cfg, ids)
  errs = {}
  for smooth in (False, True):
    q = smoothquant.smoothquant(params, cfg, ids, w_bits=bits, smooth=smooth)
    out = np.asarray(weight_activation.forward_actquant(q, cfg, x, bits))
    errs[smooth] = float(np.mean((out - ref) ** 2))
  assert errs[True] < 0.7 * errs[False], errs
