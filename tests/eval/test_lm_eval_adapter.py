"""The lm-eval adapter: request methods against direct calls / brute force, and lm_eval.simple_evaluate on local
fixture tasks (tests/eval/fixtures) with a random LLaDA, offline."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from qdllm_jax.errors import ConfigError  # noqa: E402
from qdllm_jax.eval.elbo import elbo_nll  # noqa: E402
from qdllm_jax.eval.likelihood import llada_greedy_check, llada_loglikelihood  # noqa: E402
from qdllm_jax.eval.lm_eval_adapter import QdllmLM, adapter_kwargs  # noqa: E402
from qdllm_jax.models import Model, families  # noqa: E402
from qdllm_jax.sampling import llada_generate  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _req(kind, args, i=0):
  return Instance(request_type=kind, doc={}, arguments=args, idx=i, metadata=("t", i, 1))


def _key(seed, method, call=0):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), method), call)


def exact_single_token_loglik(model, prompt, tok_id):
  x = jnp.asarray([list(prompt) + [model.mask_id]], jnp.int32)
  return float(jax.nn.log_softmax(model(x)[0, -1])[tok_id])


def test_encode_pair_moves_trailing_spaces(small_model, small_tok):
  lm = QdllmLM(model=small_model, tokenizer=small_tok)
  assert lm.encode_pair("largest: 9 2 3 7 =>", " 9") == lm.encode_pair("largest: 9 2 3 7 => ", "9")
  p, a = lm.encode_pair("largest: 9 2 3 7 =>", " 9")
  assert p[0] == small_tok.bos_token_id and p[1:] == small_tok("largest: 9 2 3 7 =>").input_ids
  assert a == small_tok(" 9").input_ids and len(a) == 1


def test_loglikelihood_matches_estimator_and_brute_force(small_model, small_tok):
  lm = QdllmLM(model=small_model, tokenizer=small_tok, mc_num=8, mc_batch=4, seed=3)
  reqs = [_req("loglikelihood", ("largest: 9 2 3 7 =>", " 9"), 0),
          _req("loglikelihood", ("In the beginning", " God created the heaven"), 1)]
  out = lm.loglikelihood(reqs)
  assert [g for _, g in out] == [False, False]
  pairs = [lm.encode_pair(*r.args) for r in reqs]
  want = llada_loglikelihood(small_model, [p for p, _ in pairs], [a for _, a in pairs], mask_id=2,
                             key=_key(3, 0), mc_num=8, batch_size=4, pad_id=0, bucket=32, pairs_per_call=64)
  np.testing.assert_allclose([v for v, _ in out], want, rtol=1e-5)
  exact = exact_single_token_loglik(small_model, pairs[0][0], pairs[0][1][0])  # single token: exact
  assert out[0][0] == pytest.approx(exact, abs=1e-4)


def test_greedy_flag(small_model, small_tok):
  lm = QdllmLM(model=small_model, tokenizer=small_tok, mc_num=8, mc_batch=4, greedy_check=True)
  reqs = [_req("loglikelihood", ("largest: 9 2 3 7 =>", c), i) for i, c in enumerate([" 9", " 2", " 3", " 7"])]
  got = [g for _, g in lm.loglikelihood(reqs)]
  want = [llada_greedy_check(small_model, *lm.encode_pair(*r.args), mask_id=2) for r in reqs]
  assert got == want and sum(want) <= 1


def test_generate_until_applies_stop_strings(small_model, small_tok):
  lm = QdllmLM(model=small_model, tokenizer=small_tok, gen_length=8, steps=8, block_length=8, batch_size=2,
               bucket=16)
  ids = small_tok("ab\ncd =>x").input_ids + [0] + small_tok("zz").input_ids
  assert lm.decode_generation(ids, ["\n"]) == "ab"
  assert lm.decode_generation(ids, [" =>"]) == "ab\ncd"
  assert lm.decode_generation(ids, []) == "ab\ncd =>x"
  prompts = ["reverse: g d i =>", "sort: 4 7 2 3 =>", "In the beginning"]
  out = lm.generate_until([_req("generate_until", (p, {"until": ["e"]}), i) for i, p in enumerate(prompts)])
  assert all("e" not in t for t in out)
  # batched and left-padded to 16 tokens above; alone and unpadded the prompt gives the same tokens
  x = np.asarray(llada_generate(small_model, np.asarray([[1] + small_tok(prompts[0]).input_ids]), mask_id=2,
                                steps=8, gen_length=8, block_length=8))
  assert out[0] == lm.decode_generation(x[0, -8:], ["e"])


def test_loglikelihood_rolling_is_the_elbo_over_windows(small_model, small_tok):
  lm = QdllmLM(model=small_model, tokenizer=small_tok, elbo_n_mc=8, elbo_mc_batch=4, max_length=17, seed=5)
  text = "In the beginning God created the heaven and the earth."
  (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
  toks = small_tok(text).input_ids
  assert len(toks) > 16  # more than one window
  wins = list(map(lm_eval.utils.make_disjoint_window,
                  lm_eval.utils.get_rolling_token_windows(toks, prefix_token=1, max_seq_len=16, context_len=1)))
  assert sum(len(b) for _, b in wins) == len(toks)
  res = elbo_nll(small_model, [list(a) for a, _ in wins], [list(b) for _, b in wins], mask_id=2, key=_key(5, 1),
                 n_mc=8, mc_batch=4, pad_id=0)
  assert got == pytest.approx(-res.nll_bound.sum(), rel=1e-6)


def test_adapter_kwargs_and_errors(small_model, small_tok):
  assert adapter_kwargs("qdlm_llada", "mmlu")["mc_num"] == 1
  assert adapter_kwargs("qdlm_llada", "gsm8k")["block_length"] == 32
  with pytest.raises(ConfigError, match="no task"):
    adapter_kwargs("qdlm_llada", "bbh_zeroshot")
  with pytest.raises(ConfigError, match="unknown QdllmLM"):
    QdllmLM(model=small_model, tokenizer=small_tok, mcnum=3)
  with pytest.raises(ConfigError, match="pretrained"):
    QdllmLM()
  with pytest.raises(ConfigError, match="a bert model does not generate"):  # an encoder family has no sampler
    QdllmLM(model=Model(params={}, config=families.preset("minilm_l6")), tokenizer=small_tok)


def test_simple_evaluate_on_local_tasks(small_model, small_tok, monkeypatch):
  from lm_eval.tasks import TaskManager
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  lm = QdllmLM(model=small_model, tokenizer=small_tok, mc_num=4, mc_batch=4, gen_length=8, steps=8,
               block_length=8, elbo_n_mc=8, elbo_mc_batch=4, max_length=64)
  tm = TaskManager(include_path=FIXTURES, include_defaults=False)
  res = lm_eval.simple_evaluate(model=lm, tasks=["qdllm_tiny_mc", "qdllm_tiny_gen", "qdllm_tiny_rolling"],
                                task_manager=tm, log_samples=False)["results"]
  import json
  docs = [json.loads(line) for line in open(os.path.join(FIXTURES, "tiny_mc.jsonl"))]
  hits = []
  for d in docs:  # every choice is one token: the estimate is the exact log-softmax, whatever the key
    p = [1] + small_tok(d["prompt"]).input_ids
    scores = [exact_single_token_loglik(small_model, p, small_tok(c).input_ids[0]) for c in d["choices"]]
    hits.append(int(np.argmax(scores)) == d["label"])
  assert res["qdllm_tiny_mc"]["acc,none"] == pytest.approx(np.mean(hits))
  assert 0.0 <= res["qdllm_tiny_gen"]["exact_match,none"] <= 1.0
  assert np.isfinite(res["qdllm_tiny_rolling"]["word_perplexity,none"])
  assert res["qdllm_tiny_rolling"]["word_perplexity,none"] > 1.0


def test_dream_requests_use_the_dream_estimator_and_sampler(small_tok):
  from qdllm_jax.eval.likelihood import dream_loglikelihood
  from qdllm_jax.models import Model, transformer
  from qdllm_jax.models.dream import DREAM_TINY_TEST, dream_config
  from qdllm_jax.sampling import dream_generate
  v = len(small_tok)
  cfg = dream_config(DREAM_TINY_TEST, vocab_size=v, mask_token_id=2, pad_token_id=0, eos_token_id=0, bos_token_id=1)
  model = Model(transformer.init_params(cfg, jax.random.key(0), std=0.3), cfg)
  with pytest.raises(ConfigError, match="no classifier-free guidance"):
    QdllmLM(model=model, tokenizer=small_tok, cfg_scale=1.0)
  lm = QdllmLM(model=model, tokenizer=small_tok, mc_num=8, mc_batch=4, seed=3, gen_length=4, steps=4, batch_size=1,
               bucket=16, cfg_scale=1.0, ignore_cfg=True)
  (got, greedy), = lm.loglikelihood([_req("loglikelihood", ("In the beginning", " God created"))])
  p, a = lm.encode_pair("In the beginning", " God created")
  want = dream_loglikelihood(model, [p], [a + [0]], mask_id=2, key=_key(3, 0), mc_num=8, batch_size=4, pad_id=0,
                             bucket=32, pairs_per_call=64)  # EOS appended: every answer token is scored
  assert got == pytest.approx(float(want[0]), rel=1e-5) and greedy is False
  (text,) = lm.generate_until([_req("generate_until", ("sort: 4 7 2 3 =>", {"until": []}))])
  ids = np.asarray([[1] + small_tok("sort: 4 7 2 3 =>").input_ids])
  pad = 16 - ids.shape[1]
  x = dream_generate(model, np.concatenate([np.zeros((1, pad), np.int64), ids], 1), mask_id=2, max_new_tokens=4,
                     steps=4, alg="origin", key=_key(3, 2), attention_mask=np.asarray([[0] * pad + [1] * ids.shape[1]]))
  assert text == lm.decode_generation(np.asarray(x)[0, 16:])
