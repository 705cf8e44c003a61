"""The shipped tiny LLaDA (qdllm_jax/shipped/tiny-llada): format constraints and that the FP model solves its tasks,
scored by the package's evaluation (eval/suite.py, the `tiny` protocol's task rows) and checked against the
written-out references of tests/data/task_reference.py."""
import dataclasses
import json
import os

import numpy as np
import pytest

from qdllm_jax.data import sequences, tasks, tokenizer
from qdllm_jax.data.shipped import TINY_MODEL_DIR
from qdllm_jax.eval import protocols, suite
from qdllm_jax.models.llada import LLADA_8B
from tests.data.task_reference import greedy_remasking, single_token_choice_scores

MODEL_DIR = TINY_MODEL_DIR
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(MODEL_DIR, "model.safetensors")),
                                reason="qdllm_jax/shipped/tiny-llada not built yet (scripts/make_tiny_model.py)")


@pytest.fixture(scope="module")
def shipped():
  from qdllm_jax.models.hf_checkpoint import load_pretrained
  return load_pretrained(MODEL_DIR), tokenizer.load_tokenizer(MODEL_DIR)


def test_format_and_size(shipped):
  model, tok = shipped
  cfg = model.config
  with open(os.path.join(MODEL_DIR, "config.json")) as f:
    raw = json.load(f)
  assert set(LLADA_8B) <= set(raw) and raw["model_type"] == "llada"
  assert cfg.d_model % 128 == 0 and cfg.d_model >= 256 and cfg.n_layers >= 4
  assert max(cfg.mlp_hidden, cfg.d_model, cfg.q_dim) >= 1024
  assert model.params["blocks"][0]["down"].shape == (cfg.d_model, cfg.mlp_hidden)
  ids = tokenizer.special_ids(tok)
  assert (raw["mask_token_id"], raw["eos_token_id"], raw["pad_token_id"], raw["bos_token_id"]) == \
      (ids["mask"], ids["eos"], ids["pad"], ids["bos"])
  assert raw["vocab_size"] == raw["embedding_size"] == len(tok)
  assert os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors")) <= 25_000_000
  for f in ("README.md", "training_summary.json", *tokenizer.TOKENIZER_FILES):
    assert os.path.isfile(os.path.join(MODEL_DIR, f)), f


# the `tiny` protocol's multiple-choice rows and its generation rows (without the answer NLL), each alone
MC_ONLY = dataclasses.replace(protocols.TINY, name="tiny_mc", perplexity=None, generation=())
GEN_ONLY = dataclasses.replace(protocols.TINY, name="tiny_gen", perplexity=None, likelihood=(), generation=tuple(
    dataclasses.replace(t, answer_nll_mc=0) for t in protocols.TINY.generation))


def test_multiple_choice_accuracy(shipped):
  model, tok = shipped
  acc = suite.evaluate(model, tok, MC_ONLY, seed=0)["multiple_choice"]["accuracy"]
  assert acc["all"] >= 0.70, acc


def test_mc_scores_match_the_exact_single_token_loglik(shipped):
  """The suite's choice scores (its Monte-Carlo estimator, one sample) equal the one-forward closed form."""
  model, tok = shipped
  r = suite.evaluate(model, tok, MC_ONLY, seed=0, limit=4, return_details=True)
  for fam, scores in r["details"]["choice_scores"].items():
    exs = [e for e in tasks.load_eval_set("mc") if e.family == fam][:4]
    np.testing.assert_allclose(np.stack(scores), np.stack(single_token_choice_scores(model, tok, exs)),
                               rtol=1e-4, atol=1e-4)


def test_generation_exact_match(shipped):
  model, tok = shipped
  acc = suite.evaluate(model, tok, GEN_ONLY, seed=0)["generation"]["exact_match"]
  assert acc["all"] >= 0.80, acc


def test_generation_matches_the_written_out_loop(shipped):
  """The suite's generation (the package sampler, left-padded batches) equals the greedy remasking loop written
  out, on 16 examples whose prompts need no padding."""
  model, tok = shipped
  fam = tasks.GEN_FAMILIES[0]
  exs = [e for e in tasks.load_eval_set("gen") if e.family == fam][:16]
  plen = len(sequences.gen_prompt_ids(tok, exs[0]))
  assert all(len(sequences.gen_prompt_ids(tok, e)) == plen for e in exs)
  got = suite.evaluate(model, tok, GEN_ONLY, seed=0, limit=16, return_details=True)["details"]["generated_ids"][fam]
  prompts = np.asarray([sequences.gen_prompt_ids(tok, e) for e in exs], np.int32)
  ref = greedy_remasking(model, prompts, sequences.GEN_LEN)
  np.testing.assert_array_equal(ref, got)
  hits = [sequences.decode_answer(tok, g) == e.answer.strip() for e, g in zip(exs, got)]
  assert np.mean(hits) >= 0.5, hits
