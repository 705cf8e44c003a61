"""eval.paired: paired statistics against scipy's paired t-test and a jackknife, and its refusals."""
import numpy as np
import pytest
from scipy import stats

from qdllm_jax.errors import ConfigError
from qdllm_jax.eval.paired import compare, paired_mean, paired_ratio


def test_paired_mean_is_scipys_paired_t():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=50)
  cand = ref + rng.normal(0.1, 0.2, size=50)
  s = paired_mean(cand - ref)
  assert s["t"] == pytest.approx(stats.ttest_rel(cand, ref).statistic, rel=1e-10)
  assert s["delta"] == pytest.approx(np.mean(cand - ref)) and s["n"] == 50
  assert paired_mean(np.zeros(5)) == {"delta": 0.0, "se": 0.0, "t": 0.0, "n": 5}
  assert paired_mean([0, 0, 1.0])["t"] > 0


def test_paired_ratio_equal_tokens_is_paired_t_and_matches_a_jackknife():
  rng = np.random.default_rng(1)
  n = np.full(64, 128.0)
  ref = rng.normal(5.7, 0.3, 64) * n
  cand = ref + rng.normal(0.01, 0.02, 64) * n
  s = paired_ratio(cand - ref, n)
  assert s["t"] == pytest.approx(stats.ttest_rel(cand / n, ref / n).statistic, rel=1e-10)
  # unequal token counts: delta-method se vs the jackknife se of sum D / sum N
  n = rng.integers(20, 200, 400).astype(float)
  d = rng.normal(0.01, 0.05, 400) * n + rng.normal(0, 0.5, 400)
  s = paired_ratio(d, n)
  assert s["delta"] == pytest.approx(d.sum() / n.sum(), rel=1e-12)
  loo = np.array([(d.sum() - d[i]) / (n.sum() - n[i]) for i in range(d.size)])
  jack = np.sqrt((d.size - 1) / d.size * np.sum((loo - loo.mean()) ** 2))
  assert s["se"] == pytest.approx(jack, rel=0.02)


def _result(seed, window_nll, choice_nll, hits, protocol="tiny"):
  return {"protocol": {"name": protocol}, "seed": seed, "key_data": None if seed is None else [0, seed],
          "details": {"window_nll": np.asarray(window_nll, float), "window_tokens": np.full(len(window_nll), 10),
                      "choice_nll": choice_nll, "gen_hits": hits}}


def test_compare_families_and_all():
  ref = _result(0, [50.0, 52.0, 49.0], {"a": [0.1, 0.2], "b": [0.0, 0.4, 0.1]},
                {"x": [True, True, True], "y": [True, False]})
  cand = _result(0, [51.0, 52.5, 50.0], {"a": [0.3, 0.2], "b": [0.1, 0.5, 0.1]},
                 {"x": [True, False, False], "y": [True, False]})
  c = compare(ref, cand)
  assert c["elbo_nats_per_token"]["delta"] == pytest.approx(2.5 / 30)
  assert c["mc_nll"]["a"]["delta"] == pytest.approx(0.1) and c["mc_nll"]["all"]["n"] == 5
  assert c["mc_nll"]["all"]["t"] == pytest.approx(
      stats.ttest_rel([0.3, 0.2, 0.1, 0.5, 0.1], [0.1, 0.2, 0.0, 0.4, 0.1]).statistic)
  assert c["gen_em"]["x"]["delta"] == pytest.approx(-2 / 3) and c["gen_em"]["y"]["t"] == 0.0
  assert c["gen_em"]["all"]["delta"] == pytest.approx(-2 / 5)


def test_compare_refuses_what_is_not_paired():
  ref = _result(0, [1.0, 2.0], {"a": [0.1, 0.2]}, {"x": [True, False]})
  with pytest.raises(ConfigError, match="return_details"):
    compare({k: v for k, v in ref.items() if k != "details"}, ref)
  with pytest.raises(ConfigError, match="same seed or key"):
    compare(ref, _result(1, [1.0, 2.0], {"a": [0.1, 0.2]}, {"x": [True, False]}))
  with pytest.raises(ConfigError, match="same seed or key"):
    compare(_result(None, [1.0, 2.0], {}, {}), _result(None, [1.0, 2.0], {}, {}))
  with pytest.raises(ConfigError, match="different protocols"):
    compare(ref, _result(0, [1.0, 2.0], {"a": [0.1, 0.2]}, {"x": [True, False]}, protocol="other"))
