"""The shipped tiny LLaDA (qdllm_jax/shipped/tiny-llada): format constraints and that the FP model solves its tasks."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.data import sequences, task_eval, tasks, tokenizer
from qdllm_jax.data.shipped import TINY_MODEL_DIR
from qdllm_jax.models import transformer
from qdllm_jax.models.llada import LLADA_8B

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


def test_multiple_choice_accuracy(shipped):
  model, tok = shipped
  acc = task_eval.eval_multiple_choice(model.params, model.config, tok, tasks.load_eval_set("mc"))
  assert acc["all"] >= 0.70, acc


@pytest.mark.slow
def test_mc_scores_match_official_estimator(shipped):
  """Exact single-token scores vs the project's LLaDA Monte-Carlo estimator (exact for 1-token answers)."""
  lik = pytest.importorskip("qdllm_jax.eval.likelihood")
  model, tok = shipped
  exs = tasks.load_eval_set("mc")[::130]
  mine = task_eval.mc_choice_scores(model.params, model.config, tok, exs)
  for ex, s in zip(exs, mine):
    ctx, _ = sequences.mc_ids(tok, ex.prompt, ex.choices[0])
    ans = [sequences.mc_ids(tok, ex.prompt, c)[1] for c in ex.choices]
    ref = lik.llada_loglikelihood(model, [ctx] * len(ans), ans, mask_id=model.config.mask_id,
                                  key=jax.random.PRNGKey(0), mc_num=1, batch_size=1)
    np.testing.assert_allclose(np.asarray(ref), s, rtol=1e-4, atol=1e-4)


def test_generation_exact_match(shipped):
  model, tok = shipped
  acc = task_eval.eval_generation(model.params, model.config, tok, tasks.load_eval_set("gen"))
  assert acc["all"] >= 0.80, acc


def _greedy_reference(params, cfg, prompts, gen_len):
  """Low-confidence remasking written out (the ML-GSAI/LLaDA generate.py loop at T=0, one block, one position per
  step): l = model(x); x0 = argmax l; conf = max softmax(l) at masked generated positions; commit the argmax."""

  b, p = prompts.shape
  x = jnp.concatenate([jnp.asarray(prompts, jnp.int32), jnp.full((b, gen_len), cfg.mask_id, jnp.int32)], 1)
  for _ in range(gen_len):
    logits = transformer.forward_jit(params, cfg, x)
    x0 = jnp.argmax(logits, -1).astype(jnp.int32)
    conf = jnp.max(jax.nn.softmax(logits, -1), -1)
    conf = jnp.where((x == cfg.mask_id) & (jnp.arange(x.shape[1]) >= p), conf, -jnp.inf)
    x = jnp.where(jax.nn.one_hot(jnp.argmax(conf, -1), x.shape[1], dtype=bool), x0, x)
  return np.asarray(x[:, p:])


def test_generation_matches_the_written_out_loop(shipped):
  """The scorer's generation (the package sampler) equals the greedy remasking loop written out here."""
  model, tok = shipped
  gen = tasks.load_eval_set("gen")
  plen = len(sequences.gen_prompt_ids(tok, gen[0]))
  exs = [e for e in gen if len(sequences.gen_prompt_ids(tok, e)) == plen][:16]
  prompts = np.asarray([sequences.gen_prompt_ids(tok, e) for e in exs], np.int32)
  mine = task_eval.greedy_generate(model.params, model.config, prompts, sequences.GEN_LEN)
  ref = _greedy_reference(model.params, model.config, prompts, sequences.GEN_LEN)
  np.testing.assert_array_equal(ref, mine)
  hits = [sequences.decode_answer(tok, g) == e.answer.strip() for e, g in zip(exs, mine)]
  assert np.mean(hits) >= 0.5, hits
