"""LLaDA generation: semi-autoregressive blocks with low-confidence (or random) remasking.

A JAX transcription of ML-GSAI/LLaDA `generate.py` (LLaDA, arXiv 2502.09992, semi-autoregressive
low-confidence remasking), run as
one `lax.scan` over all `steps`, so a (batch, prompt length, settings) combination compiles once.

Random numbers (the key schedule is part of the contract, so results are reproducible and a
reference implementation can be fed the same noise): at global step i,
  k_i = fold_in(key, i);  k_tok, k_conf = split(k_i)
  u_tok  = uniform(k_tok,  [B, T, V], noise_dtype)   (Gumbel noise; drawn only if temperature > 0)
  u_conf = uniform(k_conf, [B, T], float32)          (confidence; drawn only for remasking="random")
`llada_step_noise` returns exactly these arrays.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import ConfigError
from qdllm_jax.sampling import sampler_common

REMASKING = ("low_confidence", "random")


def llada_step_noise(key, step, shape, noise_dtype="float32"):
  """The uniforms used at global step `step`: (u_tok [B, T, V] noise_dtype, u_conf [B, T] float32).

  shape = (B, T, V). u ~ U[0, 1). See the module docstring for the key schedule.
  """
  k_tok, k_conf = jax.random.split(jax.random.fold_in(key, step))
  u_tok = jax.random.uniform(k_tok, shape, jnp.dtype(noise_dtype))
  u_conf = jax.random.uniform(k_conf, shape[:2], jnp.float32)
  return u_tok, u_conf


def gumbel_argmax(logits, u, temperature):
  """x0 = argmax_v exp(l_v) / (-log u_v)^T: a sample of softmax(l / T) (Gumbel-max), argmax at T=0.

  logits, u: [..., V] of the same float dtype (float64 in the reference). The reference form is
  used literally in float64. In float32, exp(l) overflows for l > 88, so there l is first reduced
  by its row maximum: exp(l - m) / g is the reference quantity times the positive per-row constant
  exp(-m), so in exact arithmetic the argmax is identical (not bit-identical in floating point;
  float32 is not bit-identical to the float64 reference anyway). The "log form"
  l - T log(-log u) is likewise equal only in exact arithmetic and is not used.
  Returns int32 [...].
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if logits.dtype != jnp.float64:
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  g = (-jnp.log(u)) ** temperature
  return jnp.argmax(jnp.exp(logits) / g, axis=-1).astype(jnp.int32)


def guided_logits(model, x, attention_mask, prompt_index, mask_id, cfg_scale):
  """Model logits in float32 [B, T, V], with unsupervised classifier-free guidance if cfg > 0.

  cfg > 0: un = model(x with prompt positions set to mask_id);  l = un + (cfg + 1) (cond - un).
  x: int32 [B, T]; prompt_index: bool [B, T]; attention_mask: [B, T] or None.
  """
  if cfg_scale <= 0:
    return sampler_common.call_model(model, x, attention_mask).astype(jnp.float32)
  un_x = jnp.where(prompt_index, mask_id, x)
  both = jnp.concatenate([x, un_x], axis=0)
  am = None if attention_mask is None else jnp.concatenate([attention_mask, attention_mask], 0)
  logits = sampler_common.call_model(model, both, am).astype(jnp.float32)
  cond, un = jnp.split(logits, 2, axis=0)
  return un + (cfg_scale + 1.0) * (cond - un)


@functools.partial(jax.jit, static_argnames=(
    "prompt_len", "mask_id", "num_blocks", "steps_per_block", "block_length", "temperature",
    "cfg_scale", "remasking", "eos_id", "eot_id", "logits_eos_inf", "confidence_eos_eot_inf",
    "gumbel_dtype", "noise_dtype", "return_history"))
def _llada_run(model, x, attention_mask, key, *, prompt_len, mask_id, num_blocks, steps_per_block,
               block_length, temperature, cfg_scale, remasking, eos_id, eot_id, logits_eos_inf,
               confidence_eos_eot_inf, gumbel_dtype, noise_dtype, return_history):
  """The whole sampling loop; x: int32 [B, T] canvas (prompt + masks). See `llada_generate`."""
  batch, length = x.shape
  spb = steps_per_block
  gdt = jnp.dtype(gumbel_dtype)
  pos = jnp.arange(length, dtype=jnp.int32)
  prompt_index = x != mask_id  # fixed at the start, as in the reference (pads count as prompt)

  def step(carry, i):
    x, m = carry
    blk, s = i // spb, i % spb
    blk_end = prompt_len + (blk + 1) * block_length
    in_block = (pos >= blk_end - block_length) & (pos < blk_end)
    mask_index = x == mask_id
    # masked count of the current block, taken at its first step: floor(m/spb) + (s < m mod spb)
    m = jnp.where(s == 0, jnp.sum(mask_index & in_block, axis=-1, dtype=jnp.int32), m)
    k = m // spb + (s < m % spb).astype(jnp.int32)

    logits = guided_logits(model, x, attention_mask, prompt_index, mask_id, cfg_scale)
    if logits_eos_inf:
      logits = logits.at[..., eos_id].set(-jnp.inf)
    logits = logits.astype(gdt)
    u_tok = u_conf = None
    if temperature > 0 or remasking == "random":
      u_tok, u_conf = _step_uniforms(key, i, logits.shape, temperature > 0, noise_dtype, gdt)
    x0 = gumbel_argmax(logits, u_tok, temperature)
    if remasking == "low_confidence":
      if confidence_eos_eot_inf:  # upstream: `logits_with_noise[..., eos] = logits[..., eot] = -inf`
        logits = logits.at[..., eot_id].set(-jnp.inf)  # after sampling; only the eot part is read
      p = jax.nn.softmax(logits, axis=-1)
      x0_p = jnp.take_along_axis(p, x0[..., None], axis=-1)[..., 0]
    else:
      x0_p = u_conf.astype(gdt)
    x0_p = jnp.where(pos >= blk_end, -jnp.inf, x0_p)
    x0 = jnp.where(mask_index, x0, x)
    confidence = jnp.where(mask_index, x0_p, -jnp.inf)
    transfer = sampler_common.topk_row_mask(confidence, k)
    x = jnp.where(transfer, x0, x)
    return (x, m), (x if return_history else None)

  init = (x, jnp.zeros((batch,), jnp.int32))
  (x, _), hist = jax.lax.scan(step, init, jnp.arange(num_blocks * spb, dtype=jnp.int32))
  return x, hist


def _step_uniforms(key, i, shape, need_tok, noise_dtype, gdt):
  k_tok, k_conf = jax.random.split(jax.random.fold_in(key, i))
  u_tok = None
  if need_tok:
    u_tok = jax.random.uniform(k_tok, shape, jnp.dtype(noise_dtype))
    if u_tok.dtype != gdt:  # e.g. float64 draws rounded to float32: keep u < 1 as a float32 draw is
      u_tok = jnp.minimum(u_tok.astype(gdt), jnp.asarray(np.nextafter(1, 0, dtype=gdt), gdt))
  u_conf = jax.random.uniform(k_conf, shape[:2], jnp.float32)
  return u_tok, u_conf


def llada_generate(model, prompt_ids, *, mask_id, steps=128, gen_length=128, block_length=128,
                   temperature=0.0, cfg_scale=0.0, remasking="low_confidence", attention_mask=None,
                   logits_eos_inf=False, confidence_eos_eot_inf=False, eos_id=None, eot_id=None,
                   key=None, gumbel_dtype=None, noise_dtype=None, return_history=False):
  """LLaDA semi-autoregressive masked-diffusion decoding (reference `generate.py`).

  Canvas x = [prompt, MASK x gen_length], processed in nb = gen_length / block_length blocks of
  spb = steps / nb steps. At a block's first step its masked count m is taken; step s of the
  block commits floor(m / spb) + (s < m mod spb) tokens. Each step:
    l  = model(x) (CFG: un + (cfg + 1)(cond - un), un = model(x with prompt masked));
         logits_eos_inf: l[..., eos_id] = -inf
    x0 = argmax exp(l) / (-log u)^T, u ~ U[0,1)   (plain argmax at T = 0)
    c  = softmax(l)[x0] ("low_confidence"; confidence_eos_eot_inf: with l[..., eot_id] = -inf,
         the upstream code's net effect) or U[0,1) ("random");
    c  = -inf beyond the current block and at unmasked positions; the k largest c per row are set
         to x0. Committed tokens are never remasked.

  Args:
    model: pytree callable, model(ids int32 [B, T], attention_mask=None) -> logits [B, T, V].
    prompt_ids: int [B, P]; left-pad ragged prompts and pass `attention_mask` (1 = real token).
    mask_id: the [MASK] id (126336 for LLaDA-8B).
    attention_mask: int/bool [B, P] or None; extended with ones over the generated part.
    eos_id, eot_id: needed by logits_eos_inf (eos) and confidence_eos_eot_inf (eot); LLaDA-8B uses
      126081 and 126348.
    key: PRNG key; required when temperature > 0 or remasking == "random".
    gumbel_dtype: "float64" (reference; needs x64 mode) or "float32"; None = float64 when x64 is on
      and the backend is not a TPU, else float32. Also the dtype of the confidence softmax.
    noise_dtype: dtype the uniforms are drawn in (default gumbel_dtype); float64 draws rounded to
      float32 isolate the effect of arithmetic precision (`gumbel_precision_check`).
    return_history: also return the canvas after every step, int32 [steps, B, P + gen_length].

  Returns:
    int32 [B, P + gen_length] (and the history if requested).
  Tie-breaking of equal confidences: lower position first (torch.topk's order is unspecified).
  """
  prompt = sampler_common.require_2d_int("prompt_ids", prompt_ids)
  for name, v in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
    if int(v) != v or v < 1:
      raise ConfigError(f"{name}={v!r}: expected a positive integer.")
  if gen_length % block_length:
    raise ConfigError(f"gen_length={gen_length} is not a multiple of block_length={block_length}.")
  num_blocks = gen_length // block_length
  if steps % num_blocks:
    raise ConfigError(f"steps={steps} is not a multiple of the number of blocks {num_blocks} "
                      f"(gen_length / block_length); choose steps = a multiple of {num_blocks}.")
  if remasking not in REMASKING:
    raise ConfigError(f"remasking={remasking!r}: expected one of {REMASKING}.")
  if temperature < 0 or cfg_scale < 0:
    raise ConfigError(f"temperature={temperature}, cfg_scale={cfg_scale}: both must be >= 0.")
  if logits_eos_inf and eos_id is None:
    raise ConfigError("logits_eos_inf=True needs eos_id (126081 for LLaDA-8B).")
  if confidence_eos_eot_inf and eot_id is None:
    raise ConfigError("confidence_eos_eot_inf=True needs eot_id (126348 for LLaDA-8B).")
  if (temperature > 0 or remasking == "random") and key is None:
    raise ConfigError("temperature > 0 or remasking='random' draws noise: pass key=jax.random.key(...).")
  am = sampler_common.check_padding(prompt, attention_mask, mask_id)
  gdt = sampler_common.resolve_float_dtype(gumbel_dtype, "gumbel_dtype")
  ndt = gdt if noise_dtype is None else sampler_common.resolve_float_dtype(noise_dtype, "noise_dtype")

  batch, plen = prompt.shape
  x = np.concatenate([prompt.astype(np.int32), np.full((batch, gen_length), mask_id, np.int32)], 1)
  if am is not None:
    am = jnp.asarray(np.concatenate([am, np.ones((batch, gen_length), np.int32)], axis=1))
  key = jax.random.key(0) if key is None else key
  out, hist = _llada_run(
      model, jnp.asarray(x), am, key, prompt_len=plen, mask_id=int(mask_id), num_blocks=num_blocks,
      steps_per_block=steps // num_blocks, block_length=block_length,
      temperature=float(temperature), cfg_scale=float(cfg_scale), remasking=remasking,
      eos_id=None if eos_id is None else int(eos_id), eot_id=None if eot_id is None else int(eot_id),
      logits_eos_inf=bool(logits_eos_inf), confidence_eos_eot_inf=bool(confidence_eos_eot_inf),
      gumbel_dtype=gdt, noise_dtype=ndt, return_history=bool(return_history))
  return (out, hist) if return_history else out


def _enable_x64():
  ctx = getattr(jax, "enable_x64", None)
  if ctx is None:  # older spellings
    from jax.experimental import enable_x64 as ctx  # pylint: disable=import-outside-toplevel
  return ctx(True)


def gumbel_precision_check(model, prompt_ids, *, key, **generate_kwargs):
  """Does float32 instead of float64 Gumbel arithmetic change any decoded LLaDA token?

  Runs `llada_generate` twice inside x64 mode with the same float64 uniforms: once with float64
  arithmetic (the reference) and once with the uniforms rounded to float32 and float32 arithmetic.
  All other settings come from generate_kwargs (use temperature > 0; at T = 0 only the confidence
  softmax precision differs).

  Returns a dict: tokens_float64 / tokens_float32 int32 [B, P + gen], n_diff (positions that
  differ), n_generated (B * gen_length), first_divergent_step (first step whose canvas differs,
  -1 if none).
  """
  kw = dict(generate_kwargs)
  for k in ("gumbel_dtype", "noise_dtype", "return_history"):
    kw.pop(k, None)
  with _enable_x64():
    out64, h64 = llada_generate(model, prompt_ids, key=key, gumbel_dtype="float64",
                                noise_dtype="float64", return_history=True, **kw)
    out32, h32 = llada_generate(model, prompt_ids, key=key, gumbel_dtype="float32",
                                noise_dtype="float64", return_history=True, **kw)
  out64, out32, h64, h32 = (np.asarray(a) for a in (out64, out32, h64, h32))
  step_diff = np.nonzero((h64 != h32).reshape(h64.shape[0], -1).any(axis=1))[0]
  gen = kw.get("gen_length", 128)
  return {"tokens_float64": out64, "tokens_float32": out32, "n_diff": int((out64 != out32).sum()),
          "n_generated": int(out64.shape[0] * gen),
          "first_divergent_step": int(step_diff[0]) if step_diff.size else -1}
