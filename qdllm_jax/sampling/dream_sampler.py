"""Dream generation (`diffusion_generate` / `_sample` of Dream's `generation_utils.py`, reference
Dream, arXiv 2508.15487; HKUNLP/Dream generation_utils.py), as one `lax.scan` over the steps.

Random numbers: at step i, k_i = fold_in(key, i); k_tok, k_sel = split(k_i);
  u_tok = uniform(k_tok, [B, T, V], float32)  token sampling (temperature > 0), Gumbel-max
  u_sel = uniform(k_sel, [B, T], float32)     "origin": reveal test u_sel < 1 - s/t;
                                              alg_temp > 0: Gumbel noise for the position draw.
`dream_step_noise` returns exactly these arrays.

Deviations from the PyTorch code, all in distribution-preserving or degenerate cases:
* Categorical sampling is Gumbel-max, x0 = argmax(log p + G), G = -log(-log u_tok).
* alg_temp > 0: `multinomial(softmax(c / alg_temp), n)` without replacement is drawn as the top-n
  of c / alg_temp + G (Gumbel-top-k; same distribution over ordered picks, Kool et al. 2019).
* Commit algs pick n = int(mean masked count * (1 - s/t)) per row for the whole batch, as the
  reference does; if a row has fewer than n masks, the reference would write MASK over n - m
  unmasked tie-broken positions; here only masked positions are written.
* Top-p keeps every token tied with the cut-off logit (torch's sort order among ties is unspecified).
"""
import fractions
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import ConfigError
from qdllm_jax.sampling import sampler_common

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def dream_step_noise(key, step, shape):
  """The uniforms of step `step`: (u_tok float32 [B, T, V], u_sel float32 [B, T]); shape = (B, T, V)."""
  k_tok, k_sel = jax.random.split(jax.random.fold_in(key, step))
  return (jax.random.uniform(k_tok, shape, jnp.float32),
          jax.random.uniform(k_sel, shape[:2], jnp.float32))


def dream_transfer_factors(steps, eps):
  """float32 [steps]: 1 - s/t with ts = linspace(1, eps, steps + 1) in float32; last entry 1.

  Reproduces torch.linspace in float32 on CUDA: element j is start + step * j for j < n/2 and
  end - step * (n - 1 - j) otherwise, step = fl32((end - start) / (n - 1)), each rounded once
  (fused multiply-add). Then fl32(1 - fl32(s / t)), the float32 arithmetic of the reference.
  """
  n = steps + 1
  f32 = np.float32
  start, end = f32(1.0), f32(eps)
  step = f32(end - start) / f32(n - 1)
  fr = fractions.Fraction
  ts = np.empty(n, f32)
  for j in range(n):
    if j < n // 2:
      ts[j] = f32(float(fr(float(start)) + fr(float(step)) * j))
    else:
      ts[j] = f32(float(fr(float(end)) - fr(float(step)) * (n - 1 - j)))
  factors = (f32(1.0) - (ts[1:] / ts[:-1]).astype(f32)).astype(f32)
  factors[-1] = f32(1.0)
  return factors


def _top_p(logits, top_p):
  """Keep the smallest descending prefix whose cumulative probability exceeds top_p (first token
  always kept); others -> finfo.min. logits: float32 [..., V]."""
  srt = -jnp.sort(-logits, axis=-1)
  cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
  keep_n = 1 + jnp.sum(cum[..., :-1] <= top_p, axis=-1, keepdims=True)
  thresh = jnp.take_along_axis(srt, keep_n - 1, axis=-1)
  return jnp.where(logits < thresh, jnp.finfo(logits.dtype).min, logits)


def _top_k(logits, top_k):
  """Logits below the k-th largest -> finfo.min (ties with the k-th are kept). float32 [..., V]."""
  kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
  return jnp.where(logits < kth, jnp.finfo(logits.dtype).min, logits)


def sample_tokens(logits, u_tok, *, temperature, top_p, top_k, alg):
  """Dream's `sample_tokens`: returns (confidence float32 [B, T], x0 int32 [B, T]).

  l = logits / T (T > 0); top-p; top-k; p = softmax(l);
  x0 = argmax(log p + G) with G = -log(-log u_tok) if T > 0, else argmax p;
  confidence = p[x0] (maskgit_plus, origin) | p_(1) - p_(2) (topk_margin) |
               sum p log(p + 1e-10) (entropy, i.e. minus the entropy).
  logits: float32 [B, T, V]; u_tok: float32 [B, T, V] or None (T = 0).
  """
  if temperature > 0:
    logits = logits / temperature
  if top_p is not None and top_p < 1:
    logits = _top_p(logits, top_p)
  if top_k is not None:
    logits = _top_k(logits, top_k)
  probs = jax.nn.softmax(logits, axis=-1)
  if temperature > 0:
    x0 = jnp.argmax(jnp.log(probs) - jnp.log(-jnp.log(u_tok)), axis=-1)
  else:
    x0 = jnp.argmax(probs, axis=-1)
  x0 = x0.astype(jnp.int32)
  conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
  if alg == "topk_margin":
    top2 = jax.lax.top_k(probs, 2)[0]
    conf = top2[..., 0] - top2[..., 1]
  elif alg == "entropy":
    conf = jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
  return conf, x0


@functools.partial(jax.jit, static_argnames=(
    "mask_id", "steps", "temperature", "top_p", "top_k", "alg", "alg_temp", "eps", "return_history"))
def _dream_run(model, x, attention_mask, key, *, mask_id, steps, temperature, top_p, top_k, alg,
               alg_temp, eps, return_history):
  """The whole sampling loop; x: int32 [B, T] canvas (prompt + masks). See `dream_generate`."""
  factors = jnp.asarray(dream_transfer_factors(steps, eps))
  batch = x.shape[0]

  def step(x, i):
    mask_index = x == mask_id
    raw = sampler_common.call_model(model, x, attention_mask)
    logits = sampler_common.shift_logits(raw).astype(jnp.float32)
    k_tok, k_sel = jax.random.split(jax.random.fold_in(key, i))
    u_tok = jax.random.uniform(k_tok, logits.shape, jnp.float32) if temperature > 0 else None
    u_sel = jax.random.uniform(k_sel, x.shape, jnp.float32)
    conf, x0 = sample_tokens(logits, u_tok, temperature=temperature, top_p=top_p, top_k=top_k,
                             alg=alg)
    factor = factors[i]
    if alg == "origin":  # each masked position revealed independently w.p. 1 - s/t (1 at the end)
      write = mask_index & (u_sel < factor)
    else:
      conf = conf.astype(raw.dtype)  # reference: confidence.to(logits.dtype) before the top-k
      full = jnp.where(mask_index, conf, -jnp.inf)
      mean = jnp.sum(mask_index, dtype=jnp.int32).astype(jnp.float32) / jnp.float32(batch)
      n = jnp.floor(mean * factor).astype(jnp.int32)  # int(); last step: factor 1 -> int(mean)
      if alg_temp is not None and alg_temp > 0:
        full = full.astype(jnp.float32) / alg_temp - jnp.log(-jnp.log(u_sel))
      write = sampler_common.topk_row_mask(full, jnp.full((batch,), n)) & mask_index
    x = jnp.where(write, x0, x)
    return x, (x if return_history else None)

  x, hist = jax.lax.scan(step, x, jnp.arange(steps, dtype=jnp.int32))
  return x, hist


def dream_generate(model, prompt_ids, *, mask_id, max_new_tokens, steps=512, temperature=0.0,
                   top_p=None, top_k=None, alg="origin", alg_temp=None, eps=1e-3,
                   attention_mask=None, key=None, return_history=False):
  """Dream masked-diffusion decoding of the whole canvas at once (no blocks).

  x = [prompt, MASK x max_new_tokens]; ts = linspace(1, eps, steps + 1). Step i (t = ts[i],
  s = ts[i+1]): logits are shifted (position i predicts token i), then `sample_tokens` gives
  (confidence, x0) at every position.
    origin: each masked position is revealed independently with probability 1 - s/t (1 at the
      last step) with its x0.
    maskgit_plus | topk_margin | entropy: n = int(mean over rows of the masked count * (1 - s/t)),
      all remaining (int of the mean) at the last step; the n masked positions of highest
      confidence (alg_temp > 0: drawn without replacement from softmax(confidence / alg_temp))
      are set to x0.

  Args:
    model: pytree callable, model(ids int32 [B, T], attention_mask=None) -> raw logits [B, T, V]
      where position i predicts token i+1 (unshifted); the sampler shifts.
    prompt_ids: int [B, P]; left-pad ragged prompts and pass attention_mask (1 = real token). The
      mask is extended with ones; the model derives positions (cumsum(mask) - 1) from it.
    mask_id: the [MASK] id (151666 for Dream-7B). top_k: None or >= 1. top_p: None or in (0, 1].
    key: PRNG key; required for alg="origin", temperature > 0 or alg_temp > 0.
    return_history: also return the canvas after every step, int32 [steps, B, P + max_new_tokens].
  Returns:
    int32 [B, P + max_new_tokens] (and the history if requested).
  """
  prompt = sampler_common.require_2d_int("prompt_ids", prompt_ids)
  for name, v in (("steps", steps), ("max_new_tokens", max_new_tokens)):
    if int(v) != v or v < 1:
      raise ConfigError(f"{name}={v!r}: expected a positive integer.")
  if alg not in ALGS:
    raise ConfigError(f"alg={alg!r}: expected one of {ALGS}.")
  if temperature < 0:
    raise ConfigError(f"temperature={temperature}: expected >= 0.")
  if top_p is not None and not 0 < top_p <= 1:
    raise ConfigError(f"top_p={top_p}: expected None or a value in (0, 1].")
  if top_k is not None and (int(top_k) != top_k or top_k < 1):
    raise ConfigError(f"top_k={top_k}: expected None or a positive integer.")
  if alg_temp is not None and alg_temp < 0:
    raise ConfigError(f"alg_temp={alg_temp}: expected None or >= 0.")
  if not 0 < eps < 1:
    raise ConfigError(f"eps={eps}: expected a value in (0, 1).")
  if key is None and (alg == "origin" or temperature > 0 or (alg_temp or 0) > 0):
    raise ConfigError("this configuration draws random numbers: pass key=jax.random.key(...).")
  am = sampler_common.check_padding(prompt, attention_mask, mask_id)
  batch = prompt.shape[0]
  x = np.concatenate([prompt.astype(np.int32),
                      np.full((batch, max_new_tokens), mask_id, np.int32)], axis=1)
  if am is not None:
    am = jnp.asarray(np.concatenate([am, np.ones((batch, max_new_tokens), np.int32)], axis=1))
  key = jax.random.key(0) if key is None else key
  out, hist = _dream_run(
      model, jnp.asarray(x), am, key, mask_id=int(mask_id), steps=int(steps),
      temperature=float(temperature), top_p=None if top_p is None else float(top_p),
      top_k=None if top_k is None else int(top_k), alg=alg,
      alg_temp=None if alg_temp is None else float(alg_temp), eps=float(eps),
      return_history=bool(return_history))
  return (out, hist) if return_history else out
