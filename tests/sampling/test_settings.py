"""Sampler settings: the papers' defaults, typed overrides, the mapping onto the samplers' keyword arguments, and
max_tokens rescaling (closed forms; no model is run)."""
import dataclasses

import pytest

from qdllm_jax.errors import ConfigError
from qdllm_jax.models import families, llada
from qdllm_jax.models.dream import DREAM_7B, dream_config
from qdllm_jax.models.llada import LLADA_8B, llada_config
from qdllm_jax.sampling import settings as S


def test_defaults_are_the_reference_samplers_defaults():
  llada = S.default_settings("llada")
  assert (llada.gen_length, llada.steps, llada.block_length, llada.temperature, llada.cfg_scale,
          llada.remasking) == (128, 128, 128, 0.0, 0.0, "low_confidence")
  kw = S.sampler_kwargs(S.default_settings("dream"), dream_config(DREAM_7B))
  assert kw == dict(mask_id=151666, max_new_tokens=512, steps=512, temperature=0.0, top_p=None, top_k=None,
                    alg="origin", alg_temp=None, eps=1e-3)


def test_overrides_are_typed_like_the_defaults_and_checked():
  s = S.apply_overrides(S.default_settings("dream"), [("top_p", "0.95"), ("alg", "entropy"), ("top_k", "5"),
                                                      ("temperature", "1")])
  kw = S.sampler_kwargs(s, dream_config(DREAM_7B))
  assert (kw["top_p"], kw["alg"], kw["top_k"], kw["temperature"]) == (0.95, "entropy", 5, 1.0)
  assert not S.draws_noise(S.apply_overrides(S.default_settings("dream"), [("alg", "maskgit_plus")]))
  assert S.draws_noise(S.default_settings("dream"))  # origin reveals positions at random even at temperature 0
  for bad, msg in [(("steps", "1.5"), "expected a int"), (("remasking", "top"), "remasking='top'"),
                   (("steps", "3"), "multiple of the 2 blocks"), (("cfg", "1"), "unknown key"),
                   (("alg", "origin"), "is a dream setting")]:
    base = [("block_length", "64")] if bad[1] == "3" else []
    with pytest.raises(ConfigError, match=msg):
      S.apply_overrides(S.default_settings("llada"), base + [bad])


@pytest.mark.parametrize("gen,block,steps", [(64, 64, 64), (256, 128, 256), (32, 32, 32)])
def test_with_gen_length_keeps_steps_per_token(gen, block, steps):
  base = S.default_settings("llada")  # 128 tokens, 128 steps, blocks of 128
  s = S.with_gen_length(base, gen)
  assert (s.gen_length, s.block_length, s.steps) == (gen, block, steps)
  half = S.apply_overrides(S.default_settings("llada"), [("steps", "64"), ("block_length", "32")])
  s = S.with_gen_length(half, 96)  # 0.5 steps per token, 3 blocks of 32 -> 48 steps (a multiple of 3)
  assert (s.block_length, s.steps) == (32, 48)
  with pytest.raises(ConfigError, match="multiple of the block length 32"):
    S.with_gen_length(half, 40)
  assert S.with_gen_length(S.default_settings("dream"), 100).steps == 100
  llada_kw = S.sampler_kwargs(S.with_gen_length(base, gen), llada_config(LLADA_8B))
  assert llada_kw["mask_id"] == 126336 and llada_kw["gen_length"] == gen


def test_settings_follow_the_sampler_of_the_models_family(monkeypatch):
  """A new family on LLaDA's sampler gets LLaDA's settings without an entry here; an encoder gets none."""
  monkeypatch.setitem(families.FAMILIES, "llada_like", dataclasses.replace(llada.FAMILY, name="llada_like"))
  cfg = dataclasses.replace(llada_config(LLADA_8B), arch="llada_like")
  assert S.settings_for(cfg).to_dict() == S.default_settings("llada").to_dict()
  assert S.settings_for(dream_config(DREAM_7B)).family == "dream"
  with pytest.raises(ConfigError, match="a bert model does not generate"):
    S.settings_for(families.preset("minilm_l6"))
