"""The masked-diffusion ELBO of an answer given a prompt: an upper bound on -log p(answer | prompt) in nats.

`elbo_nll`, the LLaDA form of the masked-diffusion bound with a control variate: answer a of N tokens, S a uniform
l-subset, l ~ U{1..N}, CE_i(S) = -log p(a_i | prompt, a with S masked), c_i = CE_i(whole answer masked):
  B = sum_{l=1}^{N} (1/l) E_{|S|=l} [sum_{i in S} CE_i(S)]            (= the continuous-time ELBO at eps = 0)
  B^ = sum_i c_i + mean_rows (N / l) sum_{i in S} (CE_i(S) - c_i)      (unbiased: E[(N/l) sum_S c_i] = sum_i c_i)
with counts stratified in batches of b rows (likelihood.llada_mc_masks), as in LLaDA's estimator.

With an empty prompt, B is the bound on -log p(x) of a whole text (the held-out "ELBO perplexity"
exp(sum_w B_w / sum_w N_w) of the evaluation suite). The formula is the LLaDA pretraining objective written
over the number of masked tokens (LLaDA, arXiv 2502.09992); with the control variate off, the estimate is
exactly -llada_loglikelihood (ML-GSAI/LLaDA get_log_likelihood.py) with the same key.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import ConfigError
from qdllm_jax.eval.likelihood import llada_mc_masks, masked_ce
from qdllm_jax.sampling import sampler_common


@dataclasses.dataclass(frozen=True)
class ElboResult:
  """Per-sequence results: nll_bound float64 [B] (nats, MC estimate of B(x)), nll_stderr float64
  [B] (iid standard error, conservative for stratified t), n_tokens int64 [B] (scored tokens N)."""
  nll_bound: np.ndarray
  nll_stderr: np.ndarray
  n_tokens: np.ndarray

  @property
  def nats_per_token(self):
    """B(x) / N per sequence, float64 [B]."""
    return self.nll_bound / self.n_tokens

  def perplexity(self):
    """exp(sum B(x) / sum N): the token-weighted ELBO perplexity of these sequences (float)."""
    return float(np.exp(self.nll_bound.sum() / self.n_tokens.sum()))


@functools.partial(jax.jit, static_argnames=("mask_id", "n_mc", "mc_batch", "control"))
def _elbo_chunk(model, seq, attn, prompt_len, answer_len, keys, *, mask_id, n_mc, mc_batch, control):
  """(mean, mean of squares) over the n_mc per-row estimates of B, float32 [n] each; seq int32 [n, T]."""
  n, length = seq.shape
  b = mc_batch
  pos = jnp.arange(length, dtype=jnp.int32)
  in_ans = (pos[None] >= prompt_len[:, None]) & (pos[None] < (prompt_len + answer_len)[:, None])
  if control:
    c = jnp.where(in_ans, masked_ce(sampler_common.call_model(model, jnp.where(in_ans, mask_id, seq), attn), seq), 0.0)
  else:
    c = jnp.zeros(seq.shape, jnp.float32)
  am = None if attn is None else jnp.repeat(attn, b, axis=0)
  targets = jnp.repeat(seq, b, axis=0)

  def one_batch(acc, r):
    bkeys = jax.vmap(lambda k: jax.random.fold_in(k, r))(keys)
    m, counts = jax.vmap(llada_mc_masks, (0, 0, 0, None, None))(bkeys, prompt_len, answer_len, length, b)
    rows = jnp.where(m, mask_id, seq[:, None, :]).reshape(n * b, length)
    ce = masked_ce(sampler_common.call_model(model, rows, am), targets).reshape(n, b, length)
    w = answer_len[:, None].astype(jnp.float32) / counts.astype(jnp.float32)  # N / l, [n, b]
    est = c.sum(-1)[:, None] + w * jnp.sum(jnp.where(m, ce - c[:, None], 0.0), axis=-1)
    return (acc[0] + est.sum(1), acc[1] + (est * est).sum(1)), None

  zeros = jnp.zeros((n,), jnp.float32)
  (s1, s2), _ = jax.lax.scan(one_batch, (zeros, zeros), jnp.arange(n_mc // b, dtype=jnp.int32))
  return s1 / n_mc, s2 / n_mc


def elbo_nll(model, prompts, answers, *, mask_id, key, n_mc=16, mc_batch=8, control_variate=True,
             pad_id=None, pairs_per_call=None, rows_per_call=256):
  """MC estimate of the masked-diffusion NLL bound B(answer | prompt) per pair (formula: module docstring).

  Args:
    model: model(ids int32 [R, T], attention_mask=None) -> logits [R, T, V] (R = pairs_per_call * mc_batch).
    prompts, answers: equally long lists of 1-D int sequences (a prompt may be empty; answers not).
    mask_id: the [MASK] id. key: PRNG key; pair i uses fold_in(key, i) and batch r fold_in(that, r), so a
      pair's result does not depend on the grouping. n_mc: samples per pair, a multiple of mc_batch (b).
    control_variate: subtract c_i = CE_i(whole answer masked) (one extra forward per pair); False gives
      exactly -llada_loglikelihood(prompt, answer) with the same key, mc_num = n_mc, batch_size = b.
    pad_id: right-padding id (default 0, or 1 if mask_id == 0); pairs are padded to the longest pair and the
      model gets attention_mask (exact for models that mask padded keys and keep positions, as LLaDA does).
    pairs_per_call: at most this many pairs per compiled call (default rows_per_call // mc_batch), balanced.
  Returns:
    ElboResult: nll_bound float64 [n] (nats), nll_stderr float64 [n] (iid-row standard error; conservative
    for stratified rows), n_tokens int64 [n] (answer lengths).
  """
  pad_id = (1 if mask_id == 0 else 0) if pad_id is None else int(pad_id)
  for bad, msg in ((key is None, "the ELBO estimate is random: pass key=jax.random.key(...)"),
                   (n_mc < 1 or mc_batch < 1 or n_mc % mc_batch, f"n_mc={n_mc} must be a positive multiple of "
                    f"mc_batch={mc_batch}"),
                   (len(prompts) != len(answers) or not answers, f"{len(prompts)} prompts and {len(answers)} "
                    "answers; pass one prompt per answer (>= 1)"),
                   (pad_id == mask_id, f"pad_id equals mask_id={mask_id}; choose another pad id (e.g. EOS)")):
    if bad:
      raise ConfigError(msg + ".")
  pairs = [(np.asarray(p, np.int64).reshape(-1), np.asarray(a, np.int64).reshape(-1))
           for p, a in zip(prompts, answers)]
  for i, (p, a) in enumerate(pairs):
    if a.size == 0 or np.any(p == mask_id) or np.any(a == mask_id):
      raise ConfigError(f"pair {i}: empty answer or the mask id {mask_id} in the text; expected clean tokens.")
  lengths = np.array([p.size + a.size for p, a in pairs])
  tlen = int(lengths.max())
  ppc = min(max(1, rows_per_call // mc_batch) if pairs_per_call is None else int(pairs_per_call), len(pairs))
  ppc = -(-len(pairs) // -(-len(pairs) // ppc))  # the same number of calls, balanced: least padding
  mean, sq = np.zeros(len(pairs)), np.zeros(len(pairs))
  for c in range(0, len(pairs), ppc):
    idx = np.arange(c, min(c + ppc, len(pairs)))
    full = np.concatenate([idx, np.repeat(idx[:1], ppc - idx.size)])  # a short last group repeats a pair
    seq, attn = np.full((ppc, tlen), pad_id, np.int32), np.zeros((ppc, tlen), np.int32)
    for row, i in enumerate(full):
      seq[row, :lengths[i]] = np.concatenate(pairs[i])
      attn[row, :lengths[i]] = 1
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(full, jnp.int32))
    m1, m2 = _elbo_chunk(model, jnp.asarray(seq), jnp.asarray(attn),
                         jnp.asarray([pairs[i][0].size for i in full], jnp.int32),
                         jnp.asarray([pairs[i][1].size for i in full], jnp.int32), keys, mask_id=int(mask_id),
                         n_mc=int(n_mc), mc_batch=int(mc_batch), control=bool(control_variate))
    mean[idx], sq[idx] = np.asarray(m1)[:idx.size], np.asarray(m2)[:idx.size]
  stderr = np.sqrt(np.maximum(sq - mean * mean, 0.0) / n_mc)
  return ElboResult(nll_bound=mean, nll_stderr=stderr, n_tokens=np.array([a.size for _, a in pairs], np.int64))
