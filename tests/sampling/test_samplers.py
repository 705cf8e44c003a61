"""LLaDA and Dream samplers against direct NumPy transcriptions of the reference algorithms.

The transcriptions below follow ML-GSAI/LLaDA `generate.py` and Dream's `generation_utils.py`
line by line (Python loops, float64), call the same toy model eagerly and read the same uniforms
(the documented key schedule), so every step's canvas must agree exactly.
"""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qdllm_jax.errors import ConfigError
from qdllm_jax.sampling import (
  dream_generate,
  dream_step_noise,
  dream_transfer_factors,
  gumbel_precision_check,
  llada_generate,
  llada_step_noise,
  topk_row_mask,
)

V, D, MASK = 32, 16, 31
TRACES = []


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Toy:
  """logits_i = (e[x_i] + pos[q_i] + mean_{j real} tanh((e[x_j] + pos[q_j]) W)) U + bias,
  q = cumsum(mask) - 1.

  Every position sees the whole (unpadded) sequence, so unmasking changes all logits.
  """
  emb: jax.Array
  pos: jax.Array
  mix: jax.Array
  out: jax.Array
  bias: jax.Array

  def __call__(self, input_ids, attention_mask=None):
    TRACES.append(input_ids.shape)
    am = jnp.ones(input_ids.shape, jnp.float32) if attention_mask is None else \
        jnp.asarray(attention_mask).astype(jnp.float32)
    q = jnp.clip(jnp.cumsum(am, axis=1).astype(jnp.int32) - 1, 0)
    h = self.emb[input_ids] + self.pos[q]
    ctx = jnp.sum(jnp.tanh(h @ self.mix) * am[..., None], 1) / jnp.sum(am, 1)[:, None]
    return (h + ctx[:, None]) @ self.out + self.bias


def make_toy(seed=0):
  r = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  bias = jnp.zeros((V,), jnp.float32).at[MASK].set(-30.0)  # like a trained model: never predicts MASK
  return Toy(f(V, D), f(64, D), f(D, D), f(D, V) * 0.8, bias)


_call = jax.jit(lambda model, x, am: model(x, am))


def np_logits(model, x, am=None):
  return np.asarray(_call(model, jnp.asarray(x), None if am is None else jnp.asarray(am)), np.float64)


def softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- LLaDA reference
def ref_llada(model, prompt, *, steps, gen_length, block_length, temperature=0., cfg_scale=0.,
              remasking="low_confidence", attention_mask=None, logits_eos_inf=False,
              confidence_eos_eot_inf=False, eos_id=None, eot_id=None, key=None):
  b, plen = prompt.shape
  x = np.full((b, plen + gen_length), MASK, np.int64)
  x[:, :plen] = prompt
  am = None
  if attention_mask is not None:
    am = np.concatenate([attention_mask, np.ones((b, gen_length), np.int64)], 1)
  prompt_index = x != MASK
  nb = gen_length // block_length
  spb = steps // nb
  hist = []
  for nblk in range(nb):
    block_mask_index = x[:, plen + nblk * block_length: plen + (nblk + 1) * block_length] == MASK
    mask_num = block_mask_index.sum(1)
    ntt = np.zeros((b, spb), np.int64) + (mask_num // spb)[:, None]
    for j in range(b):
      ntt[j, :mask_num[j] % spb] += 1
    for i in range(spb):
      mask_index = x == MASK
      if cfg_scale > 0:
        un_x = x.copy()
        un_x[prompt_index] = MASK
        both = np_logits(model, np.concatenate([x, un_x]), None if am is None else np.concatenate([am, am]))
        logits, un_logits = both[:b], both[b:]
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
      else:
        logits = np_logits(model, x, am)
      if logits_eos_inf:
        logits[:, :, eos_id] = -np.inf
      u_tok, u_conf = llada_step_noise(key, nblk * spb + i, logits.shape, "float64")
      if temperature == 0:
        x0 = logits.argmax(-1)
      else:
        x0 = (np.exp(logits) / (-np.log(np.asarray(u_tok))) ** temperature).argmax(-1)
      if confidence_eos_eot_inf:
        logits[:, :, eot_id] = -np.inf
      if remasking == "low_confidence":
        x0_p = np.take_along_axis(softmax(logits), x0[..., None], -1)[..., 0]
      else:
        x0_p = np.asarray(u_conf, np.float64)
      x0_p[:, plen + (nblk + 1) * block_length:] = -np.inf
      x0 = np.where(mask_index, x0, x)
      confidence = np.where(mask_index, x0_p, -np.inf)
      for j in range(b):
        sel = np.argsort(-confidence[j], kind="stable")[:ntt[j, i]]
        x[j, sel] = x0[j, sel]
      hist.append(x.copy())
  return x, np.stack(hist)


def _case_id(case):
  return "-".join(f"{k}={v}" for k, v in case.items())


LLADA_CASES = [
    dict(steps=6, gen_length=8, block_length=4),
    dict(steps=4, gen_length=8, block_length=8, remasking="random"),
    dict(steps=8, gen_length=8, block_length=2, temperature=0.7),
    dict(steps=6, gen_length=6, block_length=3, cfg_scale=1.5),
    pytest.param(dict(steps=4, gen_length=8, block_length=4, temperature=1.0, cfg_scale=0.5,
                      remasking="random"), marks=pytest.mark.slow),
    dict(steps=5, gen_length=5, block_length=5, temperature=0.5, logits_eos_inf=True,
         confidence_eos_eot_inf=True, eos_id=3, eot_id=7),
]


@pytest.mark.parametrize("case", LLADA_CASES, ids=_case_id)
def test_llada_matches_reference_every_step(case):
  model = make_toy(1)
  prompt = np.random.default_rng(2).integers(0, MASK, size=(2, 5))
  key = jax.random.key(7)
  with jax.enable_x64(True):
    out, hist = llada_generate(model, prompt, mask_id=MASK, key=key, gumbel_dtype="float64",
                               return_history=True, **case)
    ref_out, ref_hist = ref_llada(model, prompt, key=key, **case)
  np.testing.assert_array_equal(np.asarray(hist), ref_hist)
  np.testing.assert_array_equal(np.asarray(out), ref_out)
  assert not (ref_out == MASK).any()
  if case.get("logits_eos_inf"):
    assert not (ref_out[:, 5:] == case["eos_id"]).any()


def test_gumbel_precision_check_float32_vs_float64():
  model = make_toy(3)
  prompt = np.random.default_rng(4).integers(0, MASK, size=(2, 4))
  kw = dict(steps=8, gen_length=8, block_length=4, temperature=0.8)
  res = gumbel_precision_check(model, prompt, mask_id=MASK, key=jax.random.key(1), **kw)
  assert res["n_generated"] == 16 and res["tokens_float64"].shape == (2, 12)
  assert res["tokens_float32"].dtype == np.int32
  assert res["n_diff"] == int((res["tokens_float64"] != res["tokens_float32"]).sum())
  assert res["n_diff"] == 0 and res["first_divergent_step"] == -1


def test_llada_left_padding_equals_unpadded_and_compiles_once():
  model = make_toy(5)
  rng = np.random.default_rng(6)
  p_long, p_short = rng.integers(0, MASK, 6), rng.integers(0, MASK, 3)
  pad = 0
  batch = np.stack([p_long, np.concatenate([np.full(3, pad), p_short])])
  am = np.array([[1] * 6, [0] * 3 + [1] * 3])
  kw = dict(mask_id=MASK, steps=4, gen_length=8, block_length=4)
  out = np.asarray(llada_generate(model, batch, attention_mask=am, **kw))
  a = np.asarray(llada_generate(model, p_long[None], **kw))
  b = np.asarray(llada_generate(model, p_short[None], **kw))
  np.testing.assert_array_equal(out[0], a[0])
  np.testing.assert_array_equal(out[1, 3:], b[0])
  n = len(TRACES)
  llada_generate(model, batch[::-1].copy(), attention_mask=am[::-1].copy(), **kw)  # same shapes
  assert len(TRACES) == n


def test_llada_config_errors():
  model, p = make_toy(), np.zeros((1, 3), np.int64)
  with pytest.raises(ConfigError, match="multiple of block_length"):
    llada_generate(model, p, mask_id=MASK, steps=4, gen_length=6, block_length=4)
  with pytest.raises(ConfigError, match="number of blocks"):
    llada_generate(model, p, mask_id=MASK, steps=3, gen_length=8, block_length=4)
  with pytest.raises(ConfigError, match="mask id"):
    llada_generate(model, np.array([[MASK, 1, 2]]), mask_id=MASK, steps=2, gen_length=2,
                   block_length=2, attention_mask=np.array([[0, 1, 1]]))
  with pytest.raises(ConfigError, match="key"):
    llada_generate(model, p, mask_id=MASK, steps=2, gen_length=2, block_length=2, temperature=1.)
  with pytest.raises(ConfigError, match="x64"):
    llada_generate(model, p, mask_id=MASK, steps=2, gen_length=2, block_length=2,
                   gumbel_dtype="float64")
  with pytest.raises(ConfigError, match="eos_id"):
    llada_generate(model, p, mask_id=MASK, steps=2, gen_length=2, block_length=2,
                   logits_eos_inf=True)


# ----------------------------------------------------------------------------- Dream reference
def ref_sample_tokens(logits, u, temperature, top_p, top_k, alg):
  if temperature > 0:
    logits = logits / temperature
  if top_p is not None and top_p < 1:
    order = np.argsort(-logits, axis=-1, kind="stable")
    srt = np.take_along_axis(logits, order, -1)
    remove = np.cumsum(softmax(srt), -1) > top_p
    remove[..., 1:] = remove[..., :-1].copy()
    remove[..., 0] = False
    mask = np.zeros_like(remove)
    np.put_along_axis(mask, order, remove, -1)
    logits = np.where(mask, np.finfo(np.float32).min, logits)
  if top_k is not None:
    kth = np.sort(logits, -1)[..., -top_k][..., None]
    logits = np.where(logits < kth, np.finfo(np.float32).min, logits)
  probs = softmax(logits)
  if temperature > 0:
    with np.errstate(divide="ignore"):
      x0 = (np.log(probs) - np.log(-np.log(u))).argmax(-1)
    conf = np.take_along_axis(probs, x0[:, None], -1)[:, 0]
  else:
    conf, x0 = probs.max(-1), probs.argmax(-1)
  if alg == "topk_margin":
    sp = -np.sort(-probs, -1)
    conf = sp[:, 0] - sp[:, 1]
  elif alg == "entropy":
    conf = (probs * np.log(probs + 1e-10)).sum(-1)
  return conf, x0


def ref_dream(model, prompt, *, max_new_tokens, steps, temperature=0., top_p=None, top_k=None,
              alg="origin", alg_temp=None, eps=1e-3, attention_mask=None, key=None):
  b = prompt.shape[0]
  x = np.concatenate([prompt, np.full((b, max_new_tokens), MASK)], 1).astype(np.int64)
  am = None
  if attention_mask is not None:
    am = np.concatenate([attention_mask, np.ones((b, max_new_tokens), np.int64)], 1)
  ts = torch.linspace(1, eps, steps + 1).numpy()
  hist = []
  for i in range(steps):
    mask_index = x == MASK
    logits = np_logits(model, x, am)
    logits = np.concatenate([logits[:, :1], logits[:, :-1]], 1)
    u_tok, u_sel = (np.asarray(a, np.float64) for a in dream_step_noise(key, i, logits.shape))
    mask_logits = logits[mask_index]
    t, s = ts[i], ts[i + 1]
    if alg == "origin":
      p_transfer = 1 - s / t if i < steps - 1 else 1
      transfer = u_sel[mask_index] < p_transfer
      _, x0 = ref_sample_tokens(mask_logits, u_tok[mask_index], temperature, top_p, top_k, alg)
      x[mask_index] = np.where(transfer, x0, MASK)
    else:
      conf, x0 = ref_sample_tokens(mask_logits, u_tok[mask_index], temperature, top_p, top_k, alg)
      num_mask_token = np.float32(mask_index.sum()) / np.float32(b)
      n = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
      full = np.full(x.shape, -np.inf)
      full[mask_index] = conf
      if n > 0:
        if alg_temp:
          full = full / alg_temp - np.log(-np.log(u_sel))
        idx = np.argsort(-full, axis=1, kind="stable")[:, :n]
        x_ = np.full(x.shape, MASK)
        x_[mask_index] = x0
        rows = np.arange(b)[:, None]
        x[rows, idx] = x_[rows, idx]
    hist.append(x.copy())
  return x, np.stack(hist)


DREAM_CASES = [
    dict(alg="origin", steps=6),
    dict(alg="origin", steps=5, temperature=0.9, top_p=0.9),
    dict(alg="maskgit_plus", steps=4, temperature=0.8, top_p=0.95, top_k=12),
    pytest.param(dict(alg="maskgit_plus", steps=8), marks=pytest.mark.slow),
    dict(alg="topk_margin", steps=5),
    dict(alg="entropy", steps=4, temperature=0.5),
    dict(alg="entropy", steps=6, alg_temp=0.3),
]


@pytest.mark.parametrize("case", DREAM_CASES, ids=_case_id)
def test_dream_matches_reference_every_step(case):
  model = make_toy(11)
  prompt = np.random.default_rng(12).integers(0, MASK, size=(2, 4))
  key = jax.random.key(3)
  out, hist = dream_generate(model, prompt, mask_id=MASK, max_new_tokens=8, key=key,
                             return_history=True, **case)
  ref_out, ref_hist = ref_dream(model, prompt, max_new_tokens=8, key=key, **case)
  np.testing.assert_array_equal(np.asarray(hist), ref_hist)
  np.testing.assert_array_equal(np.asarray(out), ref_out)
  assert not (ref_out == MASK).any()


def test_dream_left_padding_equals_unpadded():
  model = make_toy(13)
  rng = np.random.default_rng(14)
  p_long, p_short = rng.integers(0, MASK, 5), rng.integers(0, MASK, 2)
  batch = np.stack([p_long, np.concatenate([np.zeros(3, np.int64), p_short])])
  am = np.array([[1] * 5, [0] * 3 + [1] * 2])
  kw = dict(mask_id=MASK, max_new_tokens=6, steps=6, alg="entropy")
  out = np.asarray(dream_generate(model, batch, attention_mask=am, **kw))
  np.testing.assert_array_equal(out[0], np.asarray(dream_generate(model, p_long[None], **kw))[0])
  np.testing.assert_array_equal(out[1, 3:], np.asarray(dream_generate(model, p_short[None], **kw))[0])


def test_dream_transfer_factors_match_torch_float32():
  from fractions import Fraction
  for steps, eps in [(1, 1e-3), (6, 1e-3), (128, 1e-3), (512, 1e-3), (97, 0.05)]:
    mine = dream_transfer_factors(steps, eps)
    ts = torch.linspace(1, eps, steps + 1)
    ref = (1 - ts[1:] / ts[:-1]).numpy()
    ref[-1] = 1.0
    assert mine.dtype == np.float32
    # torch's CPU kernel may round differently from its CUDA kernel by one ulp for long ranges
    assert np.abs(mine.view(np.int32) - ref.view(np.int32)).max() <= 1
    # exact: each t rounded once from the rational linspace formula with a float32 step
    st = np.float32(np.float32(eps) - np.float32(1)) / np.float32(steps)
    n = steps + 1
    exact = [np.float32(float(Fraction(1) + Fraction(float(st)) * j)) if j < n // 2 else
             np.float32(float(Fraction(float(np.float32(eps))) - Fraction(float(st)) * (n - 1 - j)))
             for j in range(n)]
    np.testing.assert_array_equal(dream_transfer_factors(steps, eps)[:-1],
                                  [np.float32(1) - np.float32(exact[j + 1] / exact[j])
                                   for j in range(steps - 1)] if steps > 1 else [])


def test_gumbel_topk_is_sampling_without_replacement():
  # P({a, b} picked, n = 2) = p_a p_b / (1 - p_a) + p_b p_a / (1 - p_b) for softmax(c / tau)
  c, tau, n_draw = np.array([0.3, -0.2, 0.9, 0.0]), 0.5, 20000
  p = softmax(c / tau)
  u = jax.random.uniform(jax.random.key(0), (n_draw, 4))
  scores = jnp.asarray(c / tau, jnp.float32)[None] - jnp.log(-jnp.log(u))
  sel = np.asarray(topk_row_mask(scores, jnp.full((n_draw,), 2)))
  assert (sel.sum(1) == 2).all()
  for a, b in itertools.combinations(range(4), 2):
    exact = p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b])
    freq = (sel[:, a] & sel[:, b]).mean()
    assert abs(freq - exact) < 4.5 * np.sqrt(exact * (1 - exact) / n_draw)


def test_dream_config_errors():
  model, p = make_toy(), np.zeros((1, 3), np.int64)
  with pytest.raises(ConfigError, match="alg"):
    dream_generate(model, p, mask_id=MASK, max_new_tokens=2, steps=2, alg="p2", key=jax.random.key(0))
  with pytest.raises(ConfigError, match="key"):
    dream_generate(model, p, mask_id=MASK, max_new_tokens=2, steps=2, alg="origin")
  with pytest.raises(ConfigError, match="top_p"):
    dream_generate(model, p, mask_id=MASK, max_new_tokens=2, steps=2, alg="entropy", top_p=1.5)
  with pytest.raises(ConfigError, match="batch"):
    dream_generate(model, np.zeros(3, np.int64), mask_id=MASK, max_new_tokens=2, steps=2,
                   alg="entropy")
