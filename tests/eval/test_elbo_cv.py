"""eval.elbo.elbo_nll (LLaDA-form ELBO with the all-masked control variate) against exact enumeration, the
continuous-time integral (scipy quad), a context-free model (where the bound is a closed-form sum) and
likelihood.llada_loglikelihood (control_variate=False is the same estimator)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_common import make_context_free, make_mixer
from scipy import integrate

from qdllm_jax.errors import ConfigError
from qdllm_jax.eval.elbo import elbo_nll
from qdllm_jax.eval.likelihood import llada_loglikelihood

MASK = 2


def np_ce(model, seq):
  """-log softmax(model(seq))[i, seq_clean[i]] in float64 for one row; returns a function of the clean row."""
  logits = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(seq[None], jnp.int32))[0], np.float64)
  z = logits - logits.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def subset_losses(model, prompt, answer):
  """{S: sum_{i in S} CE_i(S)} over every non-empty subset S of answer positions (brute force, float64)."""
  clean = np.asarray(list(prompt) + list(answer))
  p, n = len(prompt), len(answer)
  out = {}
  for l in range(1, n + 1):
    for s in itertools.combinations(range(n), l):
      x = clean.copy()
      x[[p + i for i in s]] = MASK
      lp = np_ce(model, x)
      out[s] = -sum(lp[p + i, clean[p + i]] for i in s)
  return out


def exact_bound(f, n):
  """B = sum_l (1/l) mean_{|S|=l} f(S)."""
  return sum(np.mean([v for s, v in f.items() if len(s) == l]) / l for l in range(1, n + 1))


def test_discrete_form_equals_continuous_time_elbo():
  model, prompt, answer = make_mixer(), [1, 5], [3, 4, 6, 0]
  f = subset_losses(model, prompt, answer)
  n = len(answer)
  integrand = lambda t: sum(t ** (len(s) - 1) * (1 - t) ** (n - len(s)) * v for s, v in f.items())  # noqa: E731
  cont, _ = integrate.quad(integrand, 0.0, 1.0, epsabs=1e-12, epsrel=1e-12)
  assert exact_bound(f, n) == pytest.approx(cont, rel=1e-9)


@pytest.mark.parametrize("control", [True, False])
def test_estimator_is_unbiased(control):
  model, prompt, answer = make_mixer(), [1, 5], [3, 4, 6, 0]
  want = exact_bound(subset_losses(model, prompt, answer), len(answer))
  res = elbo_nll(model, [prompt], [answer], mask_id=MASK, key=jax.random.key(3), n_mc=4096, mc_batch=4,
                 control_variate=control)
  se = res.nll_stderr[0]  # iid-row standard error of the mean (conservative for stratified rows)
  assert 0 < se < 0.05 * want
  assert abs(res.nll_bound[0] - want) < 4 * se, (res.nll_bound[0], want, se)


def test_control_variate_is_exact_for_a_context_free_model():
  model = make_context_free()
  prompts, answers = [[1], [], [4, 5, 1]], [[3, 4, 6, 0, 5, 5, 1, 3], [6, 6, 3, 0], [0, 3]]
  res = elbo_nll(model, prompts, answers, mask_id=MASK, key=jax.random.key(0), n_mc=16, mc_batch=4)
  for k, (p, a) in enumerate(zip(prompts, answers)):
    x = np.asarray(p + a)
    x[len(p):] = MASK  # context-free: CE_i is the same for every mask set containing i
    lp = np_ce(model, x)
    want = -sum(lp[len(p) + i, a[i]] for i in range(len(a)))
    assert res.nll_bound[k] == pytest.approx(want, rel=1e-5)
    assert res.nll_stderr[k] < 1e-4 * want


def test_without_control_it_is_the_llada_estimator_and_grouping_is_irrelevant():
  model = make_mixer()
  prompts, answers = [[1, 5], [3], [1, 1, 4], []], [[3, 4, 6, 0], [5, 6, 0, 1, 3, 4, 4, 0], [6, 5], [4, 4, 3]]
  key = jax.random.key(11)
  res = elbo_nll(model, prompts, answers, mask_id=MASK, key=key, n_mc=16, mc_batch=4, control_variate=False,
                 pairs_per_call=1)
  ll = llada_loglikelihood(model, prompts, answers, mask_id=MASK, key=key, mc_num=16, batch_size=4)
  np.testing.assert_allclose(res.nll_bound, -np.asarray(ll), rtol=1e-5)
  np.testing.assert_array_equal(res.n_tokens, [4, 8, 2, 3])
  grouped = elbo_nll(model, prompts, answers, mask_id=MASK, key=key, n_mc=16, mc_batch=4, control_variate=False,
                     pairs_per_call=3)  # 2 calls, the last one padded with a repeated pair
  np.testing.assert_allclose(grouped.nll_bound, res.nll_bound, rtol=1e-5)


def test_bad_inputs_raise():
  model = make_mixer()
  with pytest.raises(ConfigError, match="multiple of"):
    elbo_nll(model, [[1]], [[3, 4]], mask_id=MASK, key=jax.random.key(0), n_mc=6, mc_batch=4)
  with pytest.raises(ConfigError, match="mask id"):
    elbo_nll(model, [[1]], [[3, MASK]], mask_id=MASK, key=jax.random.key(0), n_mc=4, mc_batch=4)
  with pytest.raises(ConfigError, match="key"):
    elbo_nll(model, [[1]], [[3, 4]], mask_id=MASK, key=None)
  with pytest.raises(ConfigError, match="pad_id"):
    elbo_nll(model, [[1]], [[3, 4]], mask_id=0, key=jax.random.key(0), n_mc=4, mc_batch=4, pad_id=0)
