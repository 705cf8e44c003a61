"""suite.evaluate on a random LLaDA: determinism, agreement with the written-out scorers of
tests/data/task_reference.py (exact single-token log-likelihoods, unpadded greedy decoding), metric bookkeeping."""
import json

import numpy as np
import pytest

from qdllm_jax.data import sequences, tasks
from qdllm_jax.errors import ConfigError
from qdllm_jax.eval.suite import choice_accuracy, evaluate, exact_match
from qdllm_jax.quant.packed import QuantizedWeight
from tests.data.task_reference import greedy_remasking, single_token_choice_scores

LIMIT = 4


def _strip_timing(r):
  return {k: v for k, v in r.items() if k not in ("timing_s", "details")}


@pytest.fixture(scope="module")
def runs(small_model, small_tok):
  a = evaluate(small_model, small_tok, "tiny_smoke", seed=0, limit=LIMIT, return_details=True)
  b = evaluate(small_model, small_tok, "tiny_smoke", seed=0, limit=LIMIT)
  c = evaluate(small_model, small_tok, "tiny_smoke", seed=1, limit=LIMIT)
  return a, b, c


def _chosen(kind, names):
  exs = tasks.load_eval_set(kind)
  return {n: [e for e in exs if e.family == n][:LIMIT] for n in names}


def test_deterministic_given_the_seed(runs):
  a, b, c = runs
  assert json.dumps(_strip_timing(a), default=float) == json.dumps(_strip_timing(b), default=float)
  assert c["perplexity"]["nats_per_token"] != a["perplexity"]["nats_per_token"]  # MC noise depends on the seed
  assert c["multiple_choice"] == a["multiple_choice"]  # one-token choices: exact whatever the key
  assert c["generation"]["exact_match"] == a["generation"]["exact_match"]  # T = 0
  assert c["generation"]["answer_nll"] != a["generation"]["answer_nll"]  # an MC estimate


def test_choice_scores_match_exact_single_token_loglik(runs, small_model, small_tok):
  a = runs[0]
  chosen = _chosen("mc", tasks.MC_FAMILIES)
  for n, exs in chosen.items():
    ref = single_token_choice_scores(small_model, small_tok, exs)
    got = a["details"]["choice_scores"][n]
    np.testing.assert_allclose(np.stack(got), np.stack(ref), atol=1e-4, rtol=1e-5)
    assert a["multiple_choice"]["accuracy"][n] == choice_accuracy(ref, [e.label for e in exs])
    want_nll = np.mean([np.log(np.exp(np.asarray(r, np.float64)).sum()) - r[e.label] for r, e in zip(ref, exs)])
    assert a["multiple_choice"]["choice_nll"][n] == pytest.approx(want_nll, rel=1e-4)
  allhits = [int(np.argmax(s)) == e.label for n, exs in chosen.items()
             for s, e in zip(a["details"]["choice_scores"][n], exs)]
  assert a["metrics"]["mc_acc/all"] == pytest.approx(np.mean(allhits))


def test_generation_matches_unpadded_greedy_decoding(runs, small_model, small_tok):
  a = runs[0]
  for n, exs in _chosen("gen", tasks.GEN_FAMILIES).items():
    for e, got in zip(exs, a["details"]["generated_ids"][n]):
      prompt = np.asarray([sequences.gen_prompt_ids(small_tok, e)], np.int32)
      ref = greedy_remasking(small_model, prompt, sequences.GEN_LEN)[0]
      np.testing.assert_array_equal(got, ref)
    preds = a["details"]["predictions"][n]
    assert a["generation"]["exact_match"][n] == np.mean([exact_match(p, e.answer) for p, e in zip(preds, exs)])
  assert a["generation"]["n"] == {f: LIMIT for f in tasks.GEN_FAMILIES}
  ans = a["generation"]["answer_nll"]  # every family has LIMIT answers of GEN_LEN tokens: "all" is the plain mean
  assert ans["all"] == pytest.approx(np.mean([ans[f] for f in tasks.GEN_FAMILIES]), rel=1e-9)
  assert all(0 < ans[f] < 3 * np.log(400) for f in tasks.GEN_FAMILIES)
  assert {f"gen_nll/{f}" for f in tasks.GEN_FAMILIES} <= set(a["metrics"])


def test_perplexity_bookkeeping_and_card(runs):
  a = runs[0]
  p = a["perplexity"]
  assert p["elbo_ppl"] == pytest.approx(np.exp(a["details"]["window_nll"].sum() / p["n_tokens"]), rel=1e-12)
  assert p["n_windows"] == 4 and p["n_tokens"] == 4 * 128 and 0 < p["stderr_nats_per_token"] < 0.5
  assert 0.5 * np.log(400) < p["nats_per_token"] < 3 * np.log(400)  # a random 400-token model: ~ uniform
  card = a["protocol"]
  assert card["name"] == "tiny_smoke" and card["limit"] == LIMIT and card["mask_id"] == 2
  assert card["perplexity"]["n_mc"] == 8 and card["generation"][0]["gen_length"] == 8
  assert a["seed"] == 0 and set(a["timing_s"]) >= {"perplexity", "multiple_choice", "generation", "total"}


@pytest.mark.slow
def test_a_packed_quantized_model_calls_the_same_way(runs, small_model, small_tok):
  from test_sensitivity import rtn2_copy
  q = rtn2_copy(small_model, group_size=32, packed=True)
  assert isinstance(q.params["blocks"][0]["q"], QuantizedWeight)
  r = evaluate(q, small_tok, "tiny_smoke", seed=0, limit=LIMIT, return_details=True)
  assert np.isfinite(r["metrics"]["elbo_ppl"]) and 0 <= r["metrics"]["mc_acc/all"] <= 1
  assert r["multiple_choice"]["n"] == {"max": LIMIT, "analogy": LIMIT, "odd": LIMIT}
  # the paired comparison against the FP run of the same seed: its deltas are the metric differences
  from qdllm_jax.eval import compare
  fp = runs[0]
  c = compare(fp, r)
  assert c["elbo_nats_per_token"]["delta"] == pytest.approx(
      r["metrics"]["elbo_nats_per_token"] - fp["metrics"]["elbo_nats_per_token"], rel=1e-9, abs=1e-12)
  for fam in ("max", "analogy", "odd", "all"):
    assert c["mc_nll"][fam]["delta"] == pytest.approx(r["metrics"][f"mc_nll/{fam}"] - fp["metrics"][f"mc_nll/{fam}"],
                                                      abs=1e-9)
  for fam in ("shift", "increment", "all"):
    assert c["gen_em"][fam]["delta"] == pytest.approx(r["metrics"][f"gen_em/{fam}"] - fp["metrics"][f"gen_em/{fam}"])
  same = compare(fp, fp)
  assert same["elbo_nats_per_token"]["delta"] == 0 and same["mc_nll"]["all"]["t"] == 0


def test_refuses_lm_eval_protocols_and_wrong_arch(small_model, small_tok):
  with pytest.raises(ConfigError, match="lm_eval_adapter"):
    evaluate(small_model, small_tok, "qdlm_llada")
  dream_like = small_model.replace(config=small_model.config.__class__(
      **dict(vars(small_model.config), arch="dream")))
  with pytest.raises(ConfigError, match="llada"):
    evaluate(dream_like, small_tok, "tiny_smoke")


@pytest.mark.parametrize("limit", [-1, 0, 2.5, True])
def test_limit_must_be_a_positive_integer(small_model, small_tok, limit):
  """limit=-1 used to slice off each family's last example ([:-1]); any limit < 1 is refused up front."""
  with pytest.raises(ConfigError, match=f"limit={limit!r}; expected None"):
    evaluate(small_model, small_tok, "tiny_smoke", limit=limit)
