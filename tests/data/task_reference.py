"""Independent references for scoring the shipped tasks, written out with the model's plain forward (no sampler,
no likelihood estimator of the package): what the evaluation suite (qdllm_jax/eval/suite.py) is checked against.

  single_token_choice_scores  every shipped choice is one token, so LLaDA's conditional log-likelihood is exact
                              with one forward: log p(c | [BOS] prompt) = log_softmax(model([BOS] prompt MASK))[-1, c]
                              (the estimator masks l = 1 of L = 1 answer tokens whatever its draw)
  greedy_remasking            LLaDA low-confidence remasking at temperature 0, one block, one position per step
                              (arXiv 2502.09992, its sampler; ML-GSAI/LLaDA generate.py): l = model(x),
                              x0 = argmax l, confidence = max softmax(l) at the masked generated positions, commit
                              the most confident one
"""
import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.data import sequences


def single_token_choice_scores(model, tok, examples) -> list:
  """float32 [K] of log p(choice | [BOS] prompt) per example, one unbatched forward each."""
  out = []
  for ex in examples:
    ctx, _ = sequences.mc_ids(tok, ex.prompt, ex.choices[0])
    cids = [sequences.mc_ids(tok, ex.prompt, c)[1] for c in ex.choices]
    assert all(len(c) == 1 for c in cids), ex.key
    logits = np.asarray(model(jnp.asarray([ctx + [model.config.mask_id]], jnp.int32)), np.float64)[0, -1]
    logp = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    out.append(logp[[c[0] for c in cids]].astype(np.float32))
  return out


def greedy_remasking(model, prompts: np.ndarray, gen_len: int) -> np.ndarray:
  """int32 prompts [B, P] (equal lengths, no padding) -> the generated int32 [B, gen_len]."""
  mask_id = model.config.mask_id
  b, p = prompts.shape
  x = jnp.concatenate([jnp.asarray(prompts, jnp.int32), jnp.full((b, gen_len), mask_id, jnp.int32)], 1)
  for _ in range(gen_len):
    logits = model(x)
    x0 = jnp.argmax(logits, -1).astype(jnp.int32)
    conf = jnp.max(jax.nn.softmax(logits, -1), -1)
    conf = jnp.where((x == mask_id) & (jnp.arange(x.shape[1]) >= p), conf, -jnp.inf)
    x = jnp.where(jax.nn.one_hot(jnp.argmax(conf, -1), x.shape[1], dtype=bool), x0, x)
  return np.asarray(x[:, p:])
