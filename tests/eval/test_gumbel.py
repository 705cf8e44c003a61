"""The float64-vs-float32 Gumbel question on a small case (docs/evaluation.md has the full-size result)."""
import jax

from qdllm_jax.data import sequences, tasks
from qdllm_jax.eval.suite import gumbel_precision_report, left_pad
from qdllm_jax.sampling.llada_sampler import gumbel_precision_check


def test_float32_gumbel_decodes_the_same_tokens_on_a_small_case(small_model, small_tok):
  rep = gumbel_precision_report(small_model, small_tok, key=jax.random.key(0), temperatures=(1.0,), limit=3)
  assert rep["n_prompts"] == 3 * len(tasks.GEN_FAMILIES)
  assert rep[1.0]["n_generated"] == rep["n_prompts"] * sequences.GEN_LEN
  assert rep[1.0]["n_diff"] == 0 and rep[1.0]["first_divergent_step"] == -1


def test_the_check_really_samples(small_model, small_tok):
  exs = [e for f in tasks.GEN_FAMILIES for e in [x for x in tasks.load_eval_set("gen") if x.family == f][:3]]
  ids, am = left_pad([sequences.gen_prompt_ids(small_tok, e) for e in exs], small_tok.eos_token_id)
  kw = dict(mask_id=2, temperature=1.0, steps=8, gen_length=8, block_length=8, attention_mask=am)
  r1 = gumbel_precision_check(small_model, ids, key=jax.random.key(1), **kw)
  r2 = gumbel_precision_check(small_model, ids, key=jax.random.key(2), **kw)
  assert (r1["tokens_float64"] != r2["tokens_float64"]).any()  # the noise is applied: other keys, other tokens
  for r in (r1, r2):  # the counts are those of the returned canvases
    assert r["n_diff"] == int((r["tokens_float64"] != r["tokens_float32"]).sum())
    assert r["n_generated"] == len(exs) * 8
