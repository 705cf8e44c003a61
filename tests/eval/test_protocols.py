"""Protocol registry integrity and the papers' settings (values typed from the experimental setups
of arXiv 2510.03274 and 2508.14896, independently of protocols.py)."""
import dataclasses
import json

import pytest

from qdllm_jax.data import sequences, tasks
from qdllm_jax.errors import ConfigError
from qdllm_jax.eval.protocols import PROTOCOLS, GenerationTask, LikelihoodTask, get_protocol
from qdllm_jax.models import families, llada


def test_every_protocol_constructs_and_is_consistent():
  assert set(PROTOCOLS) >= {"tiny", "tiny_smoke", "quant_dllm_llada", "quant_dllm_dream", "qdlm_llada", "qdlm_dream"}
  for name, p in PROTOCOLS.items():
    assert p.name == name and get_protocol(name) is p and p.validate() is p
    json.dumps(p.card())
    for t in p.likelihood:
      assert t.mc_num % t.mc_batch == 0
    for t in p.generation:
      assert t.sampler == p.arch
      if t.sampler == "llada":
        assert t.gen_length % t.block_length == 0 and t.steps % (t.gen_length // t.block_length) == 0


def _lik(p):
  return {t.name: (t.num_fewshot, t.mc_num, t.cfg_scale) for t in p.likelihood}


def test_quant_dllm_settings():
  p = get_protocol("quant_dllm_llada")
  assert _lik(p) == {"mmlu": (5, 128, 0.0), "winogrande": (5, 128, 0.0), "piqa": (0, 128, 0.0),
                     "arc_challenge": (0, 128, 0.0), "arc_easy": (0, 128, 0.0), "hellaswag": (0, 128, 0.0)}
  assert all(t.mc_batch == 8 for t in p.likelihood)
  (bbh,) = p.generation
  assert (bbh.name, bbh.num_fewshot) == ("bbh_zeroshot", 0)
  assert (bbh.gen_length, bbh.steps, bbh.block_length) == (1024, 1024, 1024)
  assert (bbh.temperature, bbh.cfg_scale, bbh.remasking) == (0.0, 0.0, "low_confidence")
  d = get_protocol("quant_dllm_dream")
  assert d.arch == "dream" and d.add_bos_token and {v[1] for v in _lik(d).values()} == {128}
  (bbh,) = d.generation
  assert (bbh.gen_length, bbh.steps, bbh.temperature, bbh.top_p, bbh.block_length) == (512, 512, 0.0, 0.95, None)


def test_qdlm_settings():
  p = get_protocol("qdlm_llada")
  assert _lik(p) == {"mmlu": (5, 1, 0.0), "winogrande": (0, 128, 0.0), "piqa": (0, 128, 0.0),
                     "arc_challenge": (0, 128, 0.0), "arc_easy": (0, 128, 0.0), "hellaswag": (0, 128, 0.0)}
  gen = {t.name: (t.num_fewshot, t.gen_length, t.steps, t.block_length) for t in p.generation}
  assert gen == {"gsm8k": (4, 256, 256, 32), "minerva_math": (0, 256, 256, 64), "humaneval": (0, 512, 512, 32),
                 "mbpp": (3, 512, 512, 32)}
  assert all((t.temperature, t.cfg_scale, t.remasking) == (0.0, 0.0, "low_confidence") for t in p.generation)
  d = get_protocol("qdlm_dream")
  assert {(t.gen_length, t.cfg_scale, t.temperature, t.top_p) for t in d.generation} == {(128, 1.0, 0.0, 0.95)}
  assert {t.name for t in d.generation} == set(gen) and _lik(d).keys() == _lik(p).keys()


def test_tiny_matches_the_shipped_tasks():
  p = get_protocol("tiny")
  assert {t.name for t in p.likelihood} == set(tasks.MC_FAMILIES)
  assert {t.name for t in p.generation} == set(tasks.GEN_FAMILIES)
  assert all((t.gen_length, t.steps, t.block_length, t.temperature) == (sequences.GEN_LEN,) * 3 + (0.0,)
             for t in p.generation)
  s = get_protocol("tiny_smoke")
  assert s.limit and s.perplexity.n_windows < p.perplexity.n_windows


@pytest.mark.parametrize("change", [
    lambda p: dataclasses.replace(p, likelihood=(LikelihoodTask("x", mc_num=100, mc_batch=8),)),
    lambda p: dataclasses.replace(p, generation=(GenerationTask("x", gen_length=100, block_length=32),)),
    lambda p: dataclasses.replace(p, generation=(GenerationTask("x", gen_length=64, steps=3, block_length=32),)),
    lambda p: dataclasses.replace(p, generation=(GenerationTask("x", sampler="dream", alg="origin", remasking=None),)),
    lambda p: dataclasses.replace(p, arch="gpt"),
    lambda p: dataclasses.replace(p, perplexity=dataclasses.replace(p.perplexity, mc_batch=6, n_mc=12)),
    lambda p: dataclasses.replace(p, likelihood=p.likelihood + p.likelihood[:1]),
])
def test_inconsistent_protocols_raise(change):
  with pytest.raises(ConfigError):
    get_protocol(change(get_protocol("tiny")))


def test_unknown_protocol_raises():
  with pytest.raises(ConfigError, match="unknown protocol"):
    get_protocol("tinyy")


def test_protocol_architectures_are_families_of_the_registry(monkeypatch):
  """A protocol names a family; a new family on LLaDA's sampler runs LLaDA generation tasks, an encoder family
  only fidelity protocols."""
  monkeypatch.setitem(families.FAMILIES, "llada_like", dataclasses.replace(llada.FAMILY, name="llada_like"))
  tiny = get_protocol("tiny")
  assert get_protocol(dataclasses.replace(tiny, name="tiny_like", arch="llada_like")).arch == "llada_like"
  with pytest.raises(ConfigError, match="encoder protocol has a fidelity spec"):
    get_protocol(dataclasses.replace(tiny, arch="bert"))
  with pytest.raises(ConfigError, match="sampler 'llada' differs from the dream family's 'dream'"):
    get_protocol(dataclasses.replace(tiny, arch="dream"))
