"""Monte-Carlo conditional log-likelihoods log p(answer | prompt) of masked-diffusion LMs.

LLaDA (`get_log_likelihood.py` / `eval_llada.py`) and Dream (QDLM `dream_base.py`, `nll_type mc`,
`log_type ftb`): LLaDA, arXiv 2502.09992 (its lower-variance estimator) and ML-GSAI/LLaDA
get_log_likelihood.py. Used for multiple-choice tasks (the option
with the highest estimate wins).

Batching / padding rule (one compile per padded length):
  * Each pair is the row [prompt, answer], right-padded with `pad_id` to its target length:
      bucket="max" (default): the longest pair of the call  -> one compile for a whole task;
      bucket=int:             the next multiple of `bucket`  -> fewer wasted tokens;
      bucket=None:            no padding; pairs are grouped by exact length and the model gets no
                              attention mask (the reference's own setting; one compile per length).
  * With padding the model is given attention_mask (1 = real token). Right padding leaves every
    real token's position unchanged (LLaDA positions 0..T-1; Dream cumsum(mask) - 1), so a model
    that masks padded keys yields exactly the logits of the unpadded row; pads are never masked
    nor scored. A model that ignores attention_mask (the released LLaDA code) needs bucket=None.
  * Pairs of one padded length are scored `pairs_per_call` at a time (model batch =
    pairs_per_call * batch_size rows, x2 with CFG); a short last group repeats a pair, discarded.
  * Pair number i uses key fold_in(key, i) and MC batch r uses fold_in(that, r), so the result of a
    pair does not depend on the bucketing or grouping.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import ConfigError
from qdllm_jax.sampling import sampler_common
from qdllm_jax.sampling.llada_sampler import guided_logits, llada_generate


def answer_uniforms(key, offsets, batch_size):
  """u[j, i] = uniform(fold_in(key, offsets[i]), [b])[j]: float32 [b, T] U[0,1) draws keyed by the
  position relative to the answer start, so a pair's masks do not depend on prompt padding or on
  the padded length. offsets: int32 [T] (negative offsets give unused draws)."""
  draw = lambda o: jax.random.uniform(jax.random.fold_in(key, o), (batch_size,), jnp.float32)
  return jax.vmap(draw)(offsets.astype(jnp.uint32)).T


def llada_stratified_counts(k, answer_len, batch_size):
  """Mask counts l_j = ((round(k + j L / b) - 1) mod L) + 1, j = 0..b-1 (round half to even).

  This is round(linspace(k, k + (b - 1) L / b, b)) of the reference, computed exactly in integers.
  k: int32 scalar in [1, L]; answer_len L: int32 scalar; batch_size b: Python int. Returns int32 [b].
  """
  j = jnp.arange(batch_size, dtype=jnp.int32)
  num = k * batch_size + j * answer_len  # (k + j L / b) * b
  q, r = num // batch_size, num % batch_size
  up = (2 * r > batch_size) | ((2 * r == batch_size) & (q % 2 == 1))
  return (q + up.astype(jnp.int32) - 1) % answer_len + 1


def llada_mc_masks(key, prompt_len, answer_len, length, batch_size):
  """One LLaDA MC batch: k ~ randint(1, L) (inclusive), counts l = llada_stratified_counts(k),
  row j masks exactly l_j answer positions chosen uniformly (the l_j smallest of iid uniforms from
  `answer_uniforms`); the prompt is never masked.

  key: PRNG key; prompt_len, answer_len: int32 scalars; length T, batch_size b: Python ints.
  Returns (is_mask bool [b, T], l int32 [b]).
  """
  k_key, p_key = jax.random.split(key)
  k = jax.random.randint(k_key, (), 1, answer_len + 1, dtype=jnp.int32)
  counts = llada_stratified_counts(k, answer_len, batch_size)
  pos = jnp.arange(length, dtype=jnp.int32)
  in_answer = (pos >= prompt_len) & (pos < prompt_len + answer_len)
  u = jnp.where(in_answer, answer_uniforms(p_key, pos - prompt_len, batch_size), 2.0)
  ranks = jnp.argsort(jnp.argsort(u, axis=-1, stable=True), axis=-1, stable=True)
  return ranks < counts[:, None], counts


def dream_mc_masks(key, prompt_len, answer_len, length, batch_size, eps, keep_ends):
  """One Dream MC batch: t_j = (u0 + j / b) mod 1, p_j = (1 - eps) t_j + eps (float32), each answer
  token masked independently with probability p_j; with keep_ends the row's first position and
  its last real token are never masked (reference: mask_indices[:, 0] = mask_indices[:, -1] = False).

  Returns (is_mask bool [b, T], p float32 [b]).
  """
  k0, k1 = jax.random.split(key)
  u0 = jax.random.uniform(k0, (), jnp.float32)
  t = jnp.mod(u0 + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  p = (1 - eps) * t + eps
  pos = jnp.arange(length, dtype=jnp.int32)
  m = answer_uniforms(k1, pos - prompt_len, batch_size) < p[:, None]
  m &= (pos >= prompt_len) & (pos < prompt_len + answer_len)
  if keep_ends:
    m &= (pos != 0) & (pos != prompt_len + answer_len - 1)
  return m, p


def masked_ce(logits, targets):
  """Cross-entropy -log softmax(logits)[target] in float32: [..., V], int [...] -> float32 [...]."""
  logits = logits.astype(jnp.float32)
  tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - tgt


@functools.partial(jax.jit, static_argnames=(
    "kind", "mask_id", "mc_num", "batch_size", "cfg_scale", "eps", "keep_ends"))
def _score_chunk(model, seq, attn, prompt_len, answer_len, keys, *, kind, mask_id, mc_num,
                 batch_size, cfg_scale, eps, keep_ends):
  """log-likelihood estimates float32 [n] for n pairs; seq int32 [n, T], keys [n] PRNG keys."""
  n, length = seq.shape
  b = batch_size
  pos = jnp.arange(length, dtype=jnp.int32)
  prompt_index = jnp.repeat((pos[None] < prompt_len[:, None]), b, axis=0)
  am = None if attn is None else jnp.repeat(attn, b, axis=0)
  targets = jnp.repeat(seq, b, axis=0).reshape(n, b, length)

  def one_batch(acc, r):
    bkeys = jax.vmap(lambda k: jax.random.fold_in(k, r))(keys)
    if kind == "llada":
      m, counts = jax.vmap(llada_mc_masks, (0, 0, 0, None, None))(
          bkeys, prompt_len, answer_len, length, b)
      p_mask = counts.astype(jnp.float32) / answer_len[:, None].astype(jnp.float32)
    else:
      m, p_mask = jax.vmap(dream_mc_masks, (0, 0, 0, None, None, None, None))(
          bkeys, prompt_len, answer_len, length, b, eps, keep_ends)
    rows = jnp.where(m, mask_id, seq[:, None, :]).reshape(n * b, length)
    if kind == "llada":
      logits = guided_logits(model, rows, am, prompt_index, mask_id, cfg_scale)
    else:
      logits = sampler_common.shift_logits(sampler_common.call_model(model, rows, am))
    ce = masked_ce(logits, targets.reshape(n * b, length)).reshape(n, b, length)
    loss = jnp.sum(jnp.where(m, ce / p_mask[..., None], 0.0), axis=(1, 2)) / b
    return acc + loss, None

  total, _ = jax.lax.scan(one_batch, jnp.zeros((n,), jnp.float32),
                          jnp.arange(mc_num // b, dtype=jnp.int32))
  return -total / (mc_num // b)


def _as_pairs(prompt_ids, answer_ids):
  """-> (list of (prompt int32 [P], answer int32 [L]), single) from one pair or two sequences."""
  def is_token_seq(x):
    if isinstance(x, (np.ndarray, jax.Array)):
      return x.ndim == 1
    return isinstance(x, (list, tuple)) and (not x or isinstance(x[0], (int, np.integer)))
  single = is_token_seq(answer_ids)
  prompts, answers = ([prompt_ids], [answer_ids]) if single else (list(prompt_ids), list(answer_ids))
  if len(prompts) != len(answers):
    raise ConfigError(f"{len(prompts)} prompts but {len(answers)} answers; pass one per pair.")
  pairs = []
  for p, a in zip(prompts, answers):
    p, a = np.asarray(p).reshape(-1), np.asarray(a).reshape(-1)
    for name, v in (("prompt", p), ("answer", a)):
      if v.size and not np.issubdtype(v.dtype, np.integer):
        raise ConfigError(f"{name} ids must be integers, got dtype {v.dtype}.")
    pairs.append((p.astype(np.int32), a.astype(np.int32)))
  return pairs, single


def _score_pairs(model, prompt_ids, answer_ids, *, kind, mask_id, mc_num, batch_size, key,
                 bucket, pad_id, pairs_per_call, cfg_scale=0.0, eps=1e-3, keep_ends=True):
  """Validate, bucket, pad and score every pair; see the module docstring for the rule."""
  if key is None:
    raise ConfigError("the MC estimate is random: pass key=jax.random.key(...).")
  if batch_size < 1 or mc_num < 1 or mc_num % batch_size:
    raise ConfigError(f"mc_num={mc_num} must be a positive multiple of batch_size={batch_size}.")
  if pairs_per_call < 1:
    raise ConfigError(f"pairs_per_call={pairs_per_call}: expected >= 1.")
  pad_id = (1 if mask_id == 0 else 0) if pad_id is None else int(pad_id)
  if pad_id == mask_id:
    raise ConfigError(f"pad_id equals mask_id={mask_id}; choose another pad id (e.g. EOS).")
  if bucket is not None and bucket != "max" and (int(bucket) != bucket or bucket < 1):
    raise ConfigError(f"bucket={bucket!r}: expected None, 'max' or a positive integer.")
  pairs, single = _as_pairs(prompt_ids, answer_ids)
  for i, (p, a) in enumerate(pairs):
    if a.size == 0:
      raise ConfigError(f"pair {i}: empty answer; every answer needs at least one token.")
    if np.any(p == mask_id) or np.any(a == mask_id):
      raise ConfigError(f"pair {i} contains the mask id {mask_id}; it would be scored as masked.")
  lengths = np.array([p.size + a.size for p, a in pairs])
  if bucket is None:
    targets = lengths
  elif bucket == "max":
    targets = np.full_like(lengths, lengths.max())
  else:
    targets = -(-lengths // int(bucket)) * int(bucket)
  out = np.zeros(len(pairs), np.float64)
  for tlen in np.unique(targets):
    idx = np.nonzero(targets == tlen)[0]
    for c in range(0, idx.size, pairs_per_call):
      chunk = idx[c:c + pairs_per_call]
      full = np.concatenate([chunk, np.repeat(chunk[:1], pairs_per_call - chunk.size)])
      seq = np.full((full.size, tlen), pad_id, np.int32)
      attn = np.zeros((full.size, tlen), np.int32)
      for row, i in enumerate(full):
        p, a = pairs[i]
        seq[row, :lengths[i]] = np.concatenate([p, a])
        attn[row, :lengths[i]] = 1
      plen = np.array([pairs[i][0].size for i in full], np.int32)
      alen = np.array([pairs[i][1].size for i in full], np.int32)
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(full, jnp.int32))
      res = _score_chunk(
          model, jnp.asarray(seq), None if bucket is None else jnp.asarray(attn),
          jnp.asarray(plen), jnp.asarray(alen), keys, kind=kind, mask_id=int(mask_id),
          mc_num=int(mc_num), batch_size=int(batch_size), cfg_scale=float(cfg_scale),
          eps=float(eps), keep_ends=bool(keep_ends))
      out[chunk] = np.asarray(res)[:chunk.size]
  return float(out[0]) if single else out


def llada_loglikelihood(model, prompt_ids, answer_ids, *, mask_id, key, mc_num=128,
                        batch_size=16, cfg_scale=0.0, bucket="max", pad_id=None, pairs_per_call=1):
  """LLaDA MC estimate of log p(answer | prompt) (reference `get_log_likelihood`).

  For each of mc_num / b batches: k ~ randint(1, L); l_j = llada_stratified_counts(k) (j < b);
  row j masks exactly l_j answer tokens uniformly at random (prompt never masked);
  batch_loss = sum_j sum_{masked i} CE_i / (l_j / L) / b. loglik = -mean(batch_loss).
  CE_i = -log softmax(logits_i)[x_i] in float32; with cfg > 0 the logits are
  un + (cfg + 1)(cond - un), un from the row with the prompt masked. A 1-token answer is exact
  with any mc_num (l = 1 masks it).

  Args:
    prompt_ids, answer_ids: one pair (two 1-D int sequences; returns a float) or two equally long
      lists of 1-D int sequences (returns float64 [N]).
    mask_id: 126336 for LLaDA-8B. mc_num: multiple of batch_size (b).
    key: PRNG key; pair i uses fold_in(key, i). bucket, pad_id, pairs_per_call: module docstring.
  """
  return _score_pairs(model, prompt_ids, answer_ids, kind="llada", mask_id=mask_id, mc_num=mc_num,
                      batch_size=batch_size, key=key, bucket=bucket, pad_id=pad_id,
                      pairs_per_call=pairs_per_call, cfg_scale=cfg_scale)


def dream_loglikelihood(model, prompt_ids, answer_ids, *, mask_id, key, mc_num=128,
                        batch_size=16, eps=1e-3, keep_ends=True, bucket="max", pad_id=None,
                        pairs_per_call=1):
  """Dream MC estimate of log p(answer | prompt) (QDLM `dream_base.py`, nll_type mc, log_type ftb).

  For each of mc_num / b batches: u0 ~ U[0,1); row j: t_j = (u0 + j/b) mod 1,
  p_j = (1 - eps) t_j + eps; every answer token masked independently w.p. p_j (keep_ends: never
  the sequence's first token nor its last real token, as the reference does);
  batch_loss = sum_j sum_{masked i} CE_i / p_j / b with CE on the SHIFTED logits
  (position i predicts token i). loglik = -mean(batch_loss).
  With keep_ends the last answer token is never scored: append EOS to every answer, as the
  reference harness does (`whole_enc + [eos]`). The reference's CFG variant is not supported.

  Args: as `llada_loglikelihood`; mask_id 151666 for Dream-7B.
  """
  return _score_pairs(model, prompt_ids, answer_ids, kind="dream", mask_id=mask_id, mc_num=mc_num,
                      batch_size=batch_size, key=key, bucket=bucket, pad_id=pad_id,
                      pairs_per_call=pairs_per_call, eps=eps, keep_ends=keep_ends)


def llada_greedy_check(model, prompt_ids, answer_ids, *, mask_id, cfg_scale=0.0):
  """Reference `suffix_greedy_prediction`: is the answer what greedy decoding produces?

  Masks the whole answer (length L), then for L steps sets the single masked position of highest
  confidence softmax(l)[argmax l] to its argmax; True iff the result equals the answer. This is
  `llada_generate` with steps = gen_length = block_length = L, temperature 0, low_confidence.
  prompt_ids, answer_ids: 1-D int sequences. Returns a Python bool.
  """
  (prompt, answer), = _as_pairs(prompt_ids, answer_ids)[0]
  if answer.size == 0:
    raise ConfigError("empty answer; the greedy check needs at least one answer token.")
  n = int(answer.size)
  out = llada_generate(model, prompt[None], mask_id=mask_id, steps=n, gen_length=n,
                       block_length=n, cfg_scale=cfg_scale, gumbel_dtype="float32")
  return bool((np.asarray(out)[0, prompt.size:] == answer).all())
