"""Settings of each masked-diffusion sampler with the papers' defaults, typed overrides, and one call to decode.

A model family names the sampler it uses (`Family.sampler`: "llada" or "dream"); the settings are keyed by that
sampler kind (the ConfigDict's fixed "family" key holds it), so a new family on an existing sampler needs nothing
here.

  settings = default_settings("llada")                     # ml_collections.ConfigDict, typed defaults
  settings = settings_for(model.config)                    # the same, for the sampler of the model's family
  apply_overrides(settings, [("steps", "64")])             # the launch's typed parsing (--sampler.steps=64)
  ids = run_sampler(model, prompt_ids, settings, key=key)  # llada_generate / dream_generate

LLaDA (arXiv 2502.09992, reference `generate.py` defaults): gen_length 128, steps 128, block_length 128,
temperature 0, cfg_scale 0, remasking "low_confidence". Dream (arXiv 2508.15487, `diffusion_generate` defaults):
steps 512, temperature 0, top_p / top_k off, alg "origin", alg_temp off, eps 1e-3; gen_length (Dream's
max_new_tokens) 512 as in Dream's README example. Every value is typed (no None), so the launch's
override parser types `--sampler.KEY=VALUE` like the default: top_p 1.0, top_k 0 and alg_temp 0.0 mean "off".
"""
from __future__ import annotations

import jax
import ml_collections as mlc

from qdllm_jax.cli import set_override
from qdllm_jax.errors import ConfigError
from qdllm_jax.models.families import family_of
from qdllm_jax.sampling.dream_sampler import ALGS, dream_generate
from qdllm_jax.sampling.llada_sampler import REMASKING, llada_generate

LLADA = dict(gen_length=128, steps=128, block_length=128, temperature=0.0, cfg_scale=0.0,
             remasking="low_confidence")
DREAM = dict(gen_length=512, steps=512, temperature=0.0, top_p=1.0, top_k=0, alg="origin", alg_temp=0.0,
             eps=1e-3)
DEFAULTS = {"llada": LLADA, "dream": DREAM}


def default_settings(sampler: str) -> mlc.ConfigDict:
  """The sampler's defaults as a ConfigDict (keys of LLADA or DREAM plus "family" = the sampler kind)."""
  if sampler not in DEFAULTS:
    raise ConfigError(f"no sampler {sampler!r}; expected one of {sorted(DEFAULTS)}")
  return mlc.ConfigDict(dict(DEFAULTS[sampler], family=sampler))


def settings_for(config) -> mlc.ConfigDict:
  """`default_settings` of the sampler of ModelConfig `config`'s family; ConfigError for a family that does not
  generate (an encoder)."""
  fam = family_of(config)
  if fam.sampler is None:
    raise ConfigError(f"a {fam.name} model does not generate (its family has no masked-diffusion sampler); "
                      f"serve or sample a model of a family with one of {sorted(DEFAULTS)}, e.g. LLaDA or Dream")
  return default_settings(fam.sampler)


def apply_overrides(settings: mlc.ConfigDict, overrides) -> mlc.ConfigDict:
  """Set [(key, text or value)] on `settings` (typed like the defaults), then `validate`; returns settings.

  A key of the other sampler gets an error naming the sampler of this model."""
  fam = settings.family
  for key, value in overrides:
    other = [f for f, d in DEFAULTS.items() if f != fam and key in d]
    if key not in settings and other:
      raise ConfigError(f"--sampler.{key} is a {other[0]} setting; this model uses the {fam} sampler, whose "
                        f"settings are {sorted(DEFAULTS[fam])}")
    if key == "family":
      raise ConfigError("--sampler.family is fixed by the model's config.json; it cannot be overridden")
    set_override(settings, key, value, prefix="--sampler.", hidden=("family",))
  validate(settings)
  return settings


def validate(s: mlc.ConfigDict) -> None:
  """ConfigError unless the settings can be decoded (the samplers' own checks, before any model work)."""
  if s.gen_length < 1 or s.steps < 1:
    raise ConfigError(f"gen_length={s.gen_length}, steps={s.steps}: both must be positive integers")
  if s.temperature < 0:
    raise ConfigError(f"temperature={s.temperature}: expected >= 0")
  if s.family == "llada":
    if s.block_length < 1 or s.gen_length % s.block_length:
      raise ConfigError(f"gen_length={s.gen_length} is not a multiple of block_length={s.block_length}; set "
                        "--sampler.block_length to a divisor of gen_length")
    nb = s.gen_length // s.block_length
    if s.steps % nb:
      raise ConfigError(f"steps={s.steps} is not a multiple of the {nb} blocks (gen_length / block_length); "
                        f"choose steps = a multiple of {nb}")
    if s.remasking not in REMASKING or s.cfg_scale < 0:
      raise ConfigError(f"remasking={s.remasking!r}, cfg_scale={s.cfg_scale}: expected one of {REMASKING} and "
                        "cfg_scale >= 0")
  else:
    if s.alg not in ALGS or not 0 < s.top_p <= 1 or s.top_k < 0 or s.alg_temp < 0 or not 0 < s.eps < 1:
      raise ConfigError(f"alg={s.alg!r} top_p={s.top_p} top_k={s.top_k} alg_temp={s.alg_temp} eps={s.eps}: "
                        f"expected alg in {ALGS}, top_p in (0, 1], top_k >= 0 (0 = off), alg_temp >= 0, eps in (0, 1)")


def with_gen_length(s: mlc.ConfigDict, gen_length: int) -> mlc.ConfigDict:
  """A copy decoding `gen_length` tokens with the same steps per token (and, for LLaDA, the same block length,
  or one block when gen_length is shorter). ConfigError when LLaDA's blocks do not divide gen_length."""
  out = mlc.ConfigDict(s.to_dict())
  per_token = s.steps / s.gen_length
  out.gen_length = int(gen_length)
  if s.family == "llada":
    out.block_length = min(s.block_length, out.gen_length)
    if out.gen_length % out.block_length:
      raise ConfigError(f"max_tokens={gen_length} is not a multiple of the block length {s.block_length}; use a "
                        f"multiple of {s.block_length} (or at most {s.block_length})")
    nb = out.gen_length // out.block_length
    out.steps = max(nb, round(out.gen_length * per_token / nb) * nb)
  else:
    out.steps = max(1, round(out.gen_length * per_token))
  validate(out)
  return out


def draws_noise(s: mlc.ConfigDict) -> bool:
  """Whether the result depends on the key (so rows of one batch share random numbers)."""
  if s.family == "llada":
    return s.temperature > 0 or s.remasking == "random"
  return s.temperature > 0 or s.alg == "origin" or s.alg_temp > 0


def batch_key(s: mlc.ConfigDict) -> tuple:
  """Hashable identity of the settings: only requests with equal keys may share a batch."""
  return tuple(sorted(s.to_dict().items()))


def sampler_kwargs(s: mlc.ConfigDict, config) -> dict:
  """Keyword arguments of llada_generate / dream_generate for settings `s` and a ModelConfig `config`."""
  if config.mask_id is None:
    raise ConfigError("the model's config.json has no mask token id (mask_token_id); a masked-diffusion model "
                      "needs one")
  if s.family == "llada":
    return dict(mask_id=config.mask_id, steps=s.steps, gen_length=s.gen_length, block_length=s.block_length,
                temperature=s.temperature, cfg_scale=s.cfg_scale, remasking=s.remasking)
  return dict(mask_id=config.mask_id, max_new_tokens=s.gen_length, steps=s.steps, temperature=s.temperature,
              top_p=s.top_p if s.top_p < 1 else None, top_k=s.top_k or None, alg=s.alg,
              alg_temp=s.alg_temp or None, eps=s.eps)


def run_sampler(model, prompt_ids, s: mlc.ConfigDict, *, key: jax.Array, attention_mask=None):
  """Decode: int [B, P] prompts (left-padded, with attention_mask [B, P] when ragged) -> int32 [B, P + gen_length].

  `key` is passed to the sampler unchanged, so the result equals calling llada_generate / dream_generate with
  `sampler_kwargs(s, model.config)` and the same key."""
  if s.family != family_of(model.config).sampler:
    raise ConfigError(f"settings of the {s.family!r} sampler for a {model.config.arch} model, whose family samples "
                      f"with {family_of(model.config).sampler!r}")
  fn = llada_generate if s.family == "llada" else dream_generate
  return fn(model, prompt_ids, key=key, attention_mask=attention_mask, **sampler_kwargs(s, model.config))
