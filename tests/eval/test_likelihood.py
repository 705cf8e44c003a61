"""MC log-likelihood estimators (LLaDA, Dream).

References: NumPy transcriptions of `get_log_likelihood.py` / Dream's `_eval_target_nll_mc` fed the
same masks, exact enumeration of the estimators' expectations on tiny cases, closed forms.
"""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.errors import ConfigError
from qdllm_jax.eval.likelihood import (
  dream_loglikelihood,
  dream_mc_masks,
  llada_greedy_check,
  llada_loglikelihood,
  llada_mc_masks,
  llada_stratified_counts,
)

V, D, MASK = 24, 12, 23


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Toy:
  """logits_i = (e[x_i] + pos[q_i] + mean_{j real} tanh((e[x_j] + pos[q_j]) W)) U + bias,
  q = cumsum(mask) - 1; padded keys (mask 0) are ignored."""
  emb: jax.Array
  pos: jax.Array
  mix: jax.Array
  out: jax.Array
  bias: jax.Array

  def __call__(self, input_ids, attention_mask=None):
    am = jnp.ones(input_ids.shape, jnp.float32) if attention_mask is None else \
        jnp.asarray(attention_mask).astype(jnp.float32)
    q = jnp.clip(jnp.cumsum(am, axis=1).astype(jnp.int32) - 1, 0)
    h = self.emb[input_ids] + self.pos[q]
    ctx = jnp.sum(jnp.tanh(h @ self.mix) * am[..., None], 1) / jnp.sum(am, 1)[:, None]
    return (h + ctx[:, None]) @ self.out + self.bias


def make_toy(seed=0):
  r = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  return Toy(f(V, D), f(64, D), f(D, D), f(D, V) * 0.7, jnp.zeros((V,), jnp.float32))


_call = jax.jit(lambda model, x: model(x))


def np_logits(model, x):
  return np.asarray(_call(model, jnp.asarray(np.atleast_2d(x))), np.float64)


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(logits, targets):
  return -np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]


llada_masks = jax.jit(llada_mc_masks, static_argnums=(3, 4))
dream_masks = jax.jit(dream_mc_masks, static_argnums=(3, 4, 5, 6))


def ref_counts(k, L, b):
  l = np.round(np.linspace(float(k), k + (b - 1) * (L / b), b)).astype(np.int64)
  return ((l - 1) % L) + 1


def batch_keys(key, pair, r):
  return jax.random.fold_in(jax.random.fold_in(key, pair), r)


# ------------------------------------------------------------------------------------- LLaDA
def test_stratified_counts_match_rounded_linspace():
  kl = np.array([(k, L) for L in range(1, 41) for k in range(1, L + 1)], np.int32)
  for b in (1, 2, 3, 4, 5, 7, 8, 16, 32):
    counts = jax.jit(jax.vmap(llada_stratified_counts, (0, 0, None)), static_argnums=2)
    got = np.asarray(counts(jnp.asarray(kl[:, 0]), jnp.asarray(kl[:, 1]), b))
    for (k, L), row in zip(kl, got):
      np.testing.assert_array_equal(row, ref_counts(k, L, b), err_msg=f"b={b} L={L} k={k}")


def test_llada_masks_exact_counts_inside_answer():
  plen, alen, length, b = 3, 7, 12, 8
  for s in range(20):
    m, l = (np.asarray(a) for a in llada_masks(jax.random.key(s), plen, alen, length, b))
    k = l[0]  # l_0 = k
    np.testing.assert_array_equal(l, ref_counts(k, alen, b))
    np.testing.assert_array_equal(m.sum(1), l)
    assert not m[:, :plen].any() and not m[:, plen + alen:].any()
  # padding- and prompt-invariance: masks follow the answer, not the absolute position
  m1, _ = llada_masks(jax.random.key(3), 2, 5, 7, 4)
  m2, _ = llada_masks(jax.random.key(3), 4, 5, 16, 4)
  np.testing.assert_array_equal(np.asarray(m1)[:, 2:7], np.asarray(m2)[:, 4:9])


def ref_llada_loglik(model, prompt, answer, key, pair, mc_num, b, cfg=0.0):
  """`get_log_likelihood` in NumPy, with the masks of llada_mc_masks for the same keys."""
  seq = np.concatenate([prompt, answer])
  plen, alen = len(prompt), len(answer)
  losses = []
  for r in range(mc_num // b):
    m, l = (np.asarray(a) for a in llada_masks(batch_keys(key, pair, r), plen, alen, len(seq), b))
    noisy = np.where(m, MASK, seq[None])
    logits = np_logits(model, noisy)
    if cfg > 0:
      un = noisy.copy()
      un[:, :plen] = MASK
      un_logits = np_logits(model, un)
      logits = un_logits + (cfg + 1) * (logits - un_logits)
    ce = np_ce(logits, np.broadcast_to(seq, noisy.shape))
    p_mask = np.repeat((l / alen)[:, None], len(seq), 1)
    losses.append((ce[m] / p_mask[m]).sum() / b)
  return -np.mean(losses)


PAIRS = ([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], [[11, 12, 13], [14, 15, 16, 17], [18, 19]])


@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_llada_matches_numpy_transcription(cfg):
  model, key = make_toy(1), jax.random.key(5)
  got = llada_loglikelihood(model, *PAIRS, mask_id=MASK, key=key, mc_num=8, batch_size=4,
                            cfg_scale=cfg, bucket="max")
  ref = [ref_llada_loglik(model, np.array(p), np.array(a), key, i, 8, 4, cfg)
         for i, (p, a) in enumerate(zip(*PAIRS))]
  np.testing.assert_allclose(got, ref, rtol=2e-5)


def test_llada_bucketing_grouping_determinism():
  model, key = make_toy(2), jax.random.key(9)
  kw = dict(mask_id=MASK, key=key, mc_num=8, batch_size=4)
  base = llada_loglikelihood(model, *PAIRS, bucket=None, **kw)
  for extra in (dict(bucket="max", pad_id=3), dict(bucket=4, pairs_per_call=2)):
    np.testing.assert_allclose(llada_loglikelihood(model, *PAIRS, **extra, **kw), base, rtol=1e-5)
  np.testing.assert_array_equal(llada_loglikelihood(model, *PAIRS, bucket=None, **kw), base)
  other = llada_loglikelihood(model, *PAIRS, bucket=None, **{**kw, "key": jax.random.key(10)})
  assert not np.allclose(other, base)


def test_llada_single_token_answer_is_exact():
  model = make_toy(3)
  prompt, target = [4, 9, 2, 7], 13
  exact = log_softmax(np_logits(model, prompt + [MASK]))[0, -1, target]
  for mc_num, b in ((1, 1), (8, 4)):
    got = llada_loglikelihood(model, prompt, [target], mask_id=MASK, key=jax.random.key(mc_num),
                              mc_num=mc_num, batch_size=b)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, exact, rtol=1e-5)


def test_llada_estimator_expectation_brute_force():
  """E[batch loss] and Var[batch loss] by enumerating k and every masked subset (L = 3, b = 4)."""
  model = make_toy(4)
  prompt, answer, b = np.array([5, 1]), np.array([8, 2, 17]), 4
  seq, L, P = np.concatenate([prompt, answer]), 3, 2
  g, v = {}, {}
  for l in range(1, L + 1):
    vals = []
    for S in itertools.combinations(range(L), l):
      noisy = seq.copy()
      noisy[[P + i for i in S]] = MASK
      ce = np_ce(np_logits(model, noisy)[0], seq)
      vals.append(sum(ce[P + i] for i in S) * L / l)
    g[l], v[l] = np.mean(vals), np.var(vals)
  means = [np.mean([g[l] for l in ref_counts(k, L, b)]) for k in range(1, L + 1)]
  cvars = [np.sum([v[l] for l in ref_counts(k, L, b)]) / b**2 for k in range(1, L + 1)]
  expect, var = np.mean(means), np.mean(cvars) + np.var(means)
  mc_num = 4096
  got = -llada_loglikelihood(model, prompt, answer, mask_id=MASK, key=jax.random.key(0),
                             mc_num=mc_num, batch_size=b)
  stderr = np.sqrt(var / (mc_num // b))
  assert abs(got - expect) < 4.5 * stderr, (got, expect, stderr)
  assert stderr < 0.02 * expect  # the test has power


def test_llada_greedy_check_matches_suffix_greedy_prediction():
  model, prompt, n = make_toy(5), np.array([3, 8, 1]), 4
  seq = np.concatenate([prompt, np.full(n, MASK)])
  for _ in range(n):  # reference: unmask the single most confident masked position per step
    mask_index = seq == MASK
    logits = np_logits(model, seq)[0][mask_index]
    x0 = logits.argmax(-1)
    conf = np.exp(log_softmax(logits))[np.arange(len(x0)), x0]
    x0[np.argsort(-conf, kind="stable")[1:]] = MASK
    seq[mask_index] = x0
  greedy = seq[len(prompt):]
  assert llada_greedy_check(model, prompt, greedy, mask_id=MASK)
  wrong = greedy.copy()
  wrong[1] = (wrong[1] + 1) % MASK
  assert not llada_greedy_check(model, prompt, wrong, mask_id=MASK)


def test_likelihood_config_errors():
  model, key = make_toy(), jax.random.key(0)
  with pytest.raises(ConfigError, match="multiple of batch_size"):
    llada_loglikelihood(model, [1, 2], [3], mask_id=MASK, key=key, mc_num=10, batch_size=4)
  with pytest.raises(ConfigError, match="empty answer"):
    llada_loglikelihood(model, [[1, 2]], [[]], mask_id=MASK, key=key, mc_num=4, batch_size=4)
  with pytest.raises(ConfigError, match="mask id"):
    llada_loglikelihood(model, [1, MASK], [3], mask_id=MASK, key=key, mc_num=4, batch_size=4)
  with pytest.raises(ConfigError, match="pad_id"):
    dream_loglikelihood(model, [1, 2], [3], mask_id=MASK, key=key, mc_num=4, batch_size=4,
                        pad_id=MASK)
  with pytest.raises(ConfigError, match="prompts but"):
    llada_loglikelihood(model, [[1], [2]], [[3]], mask_id=MASK, key=key, mc_num=4, batch_size=4)


# ------------------------------------------------------------------------------------- Dream
def ref_dream_loglik(model, prompt, answer, key, pair, mc_num, b, eps):
  """Dream `_eval_target_nll_mc` (ftb) in NumPy with the masks of dream_mc_masks."""
  seq = np.concatenate([prompt, answer])
  losses = []
  for r in range(mc_num // b):
    m, p = (np.asarray(a) for a in dream_masks(batch_keys(key, pair, r), len(prompt),
                                                  len(answer), len(seq), b, eps, True))
    assert not m[:, :len(prompt)].any() and not m[:, -1].any()
    logits = np_logits(model, np.where(m, MASK, seq[None]))
    logits = np.concatenate([logits[:, :1], logits[:, :-1]], 1)
    ce = np_ce(logits, np.broadcast_to(seq, m.shape))
    pm = np.repeat(p.astype(np.float64)[:, None], len(seq), 1)
    losses.append((ce[m] / pm[m]).sum() / b)
  return -np.mean(losses)


def test_dream_matches_numpy_transcription_and_masks():
  model, key = make_toy(6), jax.random.key(2)
  got = dream_loglikelihood(model, *PAIRS, mask_id=MASK, key=key, mc_num=16, batch_size=8,
                            bucket=8, pairs_per_call=2)
  ref = [ref_dream_loglik(model, np.array(p), np.array(a), key, i, 16, 8, 1e-3)
         for i, (p, a) in enumerate(zip(*PAIRS))]
  np.testing.assert_allclose(got, ref, rtol=2e-5)
  assert all(r < 0 for r in ref)
  # stratified t: p_j = (1 - eps) ((u0 + j/b) mod 1) + eps
  _, p = dream_mc_masks(jax.random.key(1), 2, 3, 6, 8, 1e-3, True)
  t = (np.asarray(p) - 1e-3) / (1 - 1e-3)
  np.testing.assert_allclose(np.sort((t - t[0]) % 1), np.arange(8) / 8, atol=1e-5)
