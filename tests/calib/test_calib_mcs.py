"""MCS masking (Quant-dLLM §2, released utils/mcs.py) and its variants."""
import jax
import numpy as np
import pytest

from qdllm_jax.calib import mcs
from qdllm_jax.errors import ConfigError
from qdllm_jax.models.dream import DREAM_TINY_TEST, dream_config
from qdllm_jax.models.llada import LLADA_TINY_TEST, llada_config

MASK = 120


def _ids(n, seqlen, seed=0):
  return np.random.default_rng(seed).integers(0, 100, (n, seqlen)).astype(np.int32)


def test_matches_released_rule_transcribed():
  n, seqlen = 8, 40
  ids = _ids(n, seqlen)
  out, mask, t = mcs.mcs_mask(ids, 7, MASK)
  key = jax.random.key(7)
  prefix = int(0.25 * seqlen)
  for i in range(n):  # the spec, line by line
    u = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), (seqlen,)))
    m = u < (i + 1) / n
    m[:prefix] = False
    np.testing.assert_array_equal(np.asarray(mask[i]), m)
    np.testing.assert_array_equal(np.asarray(out[i]), np.where(m, MASK, ids[i]))
  np.testing.assert_allclose(np.asarray(t), (np.arange(n) + 1) / n)


def test_mask_statistics():
  n, seqlen = 16, 4096
  out, mask, t = mcs.mcs_mask(_ids(n, seqlen), 0, MASK)
  mask, out, t = np.asarray(mask), np.asarray(out), np.asarray(t)
  prefix = int(0.25 * seqlen)
  assert not mask[:, :prefix].any()                       # prefix never masked
  assert (out[:, :prefix] != MASK).all()
  suffix = seqlen - prefix
  frac = mask[:, prefix:].mean(1)
  tol = 5 * np.sqrt(t * (1 - t) / suffix) + 1e-9          # 5 sigma binomial
  assert (np.abs(frac - t) <= tol).all(), (frac, t)
  assert mask[-1, prefix:].all()                          # t = 1 masks the whole suffix
  assert ((out == MASK) == mask).all()                    # masked -> mask id, nothing else is


def test_deterministic_and_seed_dependent():
  ids = _ids(4, 64)
  a = np.asarray(mcs.mcs_mask(ids, 3, MASK)[0])
  b = np.asarray(mcs.mcs_mask(ids, jax.random.key(3), MASK)[0])
  c = np.asarray(mcs.mcs_mask(ids, 4, MASK)[0])
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_plain_has_no_mask_ids():
  ids = _ids(4, 32)
  out, mask, t = mcs.mcs_mask(ids, 0, MASK, mode="plain")
  np.testing.assert_array_equal(np.asarray(out), ids)
  assert not np.asarray(mask).any() and (np.asarray(out) != MASK).all()


def test_timesteps_per_sample_stratified():
  n, reps, seqlen = 4, 3, 2048
  ids = _ids(n, seqlen)
  out, mask, t = mcs.mcs_mask(ids, 0, MASK, timesteps_per_sample=reps)
  out, mask, t = np.asarray(out), np.asarray(mask), np.asarray(t)
  assert out.shape == (n * reps, seqlen)
  np.testing.assert_allclose(np.sort(t), (np.arange(n * reps) + 1) / (n * reps), rtol=1e-6)
  for i in range(n):
    rows = slice(i * reps, (i + 1) * reps)
    np.testing.assert_array_equal(np.where(mask[rows], ids[i], out[rows]), np.repeat(ids[i:i + 1], reps, 0))
    strata = np.floor(t[rows] * reps - 1e-6).astype(int)  # copy s lies in [s/T, (s+1)/T]
    np.testing.assert_array_equal(strata, np.arange(reps))
  prefix = int(0.25 * seqlen)
  frac = mask[:, prefix:].mean(1)
  assert (np.abs(frac - t) <= 5 * np.sqrt(t * (1 - t) / (seqlen - prefix)) + 1e-9).all()
  # T = 1 is the released rule
  np.testing.assert_array_equal(np.asarray(mcs.mcs_mask(ids, 0, MASK, timesteps_per_sample=1)[0]),
                                np.asarray(mcs.mcs_mask(ids, 0, MASK)[0]))


def test_calibration_inputs_uses_config_mask_and_seed():
  ids = _ids(4, 32)
  lcfg, dcfg = llada_config(LLADA_TINY_TEST), dream_config(DREAM_TINY_TEST)
  np.testing.assert_array_equal(np.asarray(mcs.calibration_inputs(ids, lcfg)),
                                np.asarray(mcs.mcs_mask(ids, 0, lcfg.mask_id)[0]))
  np.testing.assert_array_equal(np.asarray(mcs.calibration_inputs(ids, dcfg)),
                                np.asarray(mcs.mcs_mask(ids, 100, dcfg.mask_id)[0]))
  np.testing.assert_array_equal(np.asarray(mcs.calibration_inputs(ids, lcfg, mode="plain")), ids)


def test_errors():
  ids = _ids(2, 8)
  with pytest.raises(ConfigError, match="mode"):
    mcs.mcs_mask(ids, 0, MASK, mode="masked")
  with pytest.raises(ConfigError, match="prefix_ratio"):
    mcs.mcs_mask(ids, 0, MASK, prefix_ratio=1.5)
  with pytest.raises(ConfigError, match="timesteps_per_sample"):
    mcs.mcs_mask(ids, 0, MASK, timesteps_per_sample=0)
  with pytest.raises(ConfigError, match="plain"):
    mcs.mcs_mask(ids, 0, MASK, mode="plain", timesteps_per_sample=2)
  with pytest.raises(ConfigError, match=r"\[N, L\]"):
    mcs.mcs_mask(ids[0], 0, MASK)
  with pytest.raises(ConfigError, match="mask"):
    mcs.calibration_inputs(ids, llada_config(LLADA_TINY_TEST, mask_token_id=None))
