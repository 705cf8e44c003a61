"""Rules tables: first match wins, printing, JSON round trip, and the errors users can cause."""
import json

import pytest

from qdllm_jax.errors import ConfigError
from qdllm_jax.models.dream import DREAM_TINY_TEST, dream_config
from qdllm_jax.models.llada import LLADA_TINY_TEST, llada_config
from qdllm_jax.quant import rules

LCFG = llada_config(LLADA_TINY_TEST)


def test_first_match_wins_and_skip():
  table = [(r"blocks\.0\.q_proj$", "skip"),
           (r"\.(q|k|v)_proj$", {"method": "gptq", "bits": 3, "group_size": 32}),
           (r"blocks\.1\.", rules.Rule("rtn", 4, 32)),
           (r".*", rules.Rule("quant_dllm", 2, 32, (("abmp_ratio", 0.05),)))]
  plan = rules.resolve_rules(table, LCFG)
  assert len(plan.modules) == 2 * 7
  assert plan.rule_for(0, "q") is None
  assert plan.rule_for(0, "k") == rules.Rule("gptq", 3, 32)
  assert plan.rule_for(1, "q") == rules.Rule("gptq", 3, 32)
  assert plan.rule_for(1, "o") == rules.Rule("rtn", 4, 32)
  assert plan.rule_for(0, "down").kwargs() == dict(method="quant_dllm", bits=2, group_size=32, abmp_ratio=0.05)
  assert plan.path_of(1, "down") == "model.transformer.blocks.1.ff_out"
  lines = plan.describe().splitlines()
  assert "model.transformer.blocks.0.q_proj -> skip" in lines
  assert "model.transformer.blocks.1.attn_out -> rtn w4 g32" in lines
  assert "model.transformer.blocks.0.ff_proj -> quant_dllm w2 g32 abmp_ratio=0.05" in lines
  assert len(plan.quantized()) == 13


def test_rule_ranges_are_the_methods_own():
  """A rule accepts what its method accepts (per-channel -1 for GPTQ/RTN, as the run config documents) and
  refuses the rest with the method's message."""
  plan = rules.resolve_rules(rules.default_rules("gptq", 3, -1, sym=True), LCFG)
  assert {r.group_size for r in plan.modules.values()} == {-1}
  for args, msg in ((("quant_dllm", 2, -1), "group_size=-1 is not supported by quant_dllm"),
                    (("quant_dllm", 4, 128), "bits=4 is not supported by quant_dllm; expected 1, 2 or 3"),
                    (("rtn", 9, 128), "bits=9 is not supported by rtn"), (("gptq", 3, 0), "group_size=0")):
    with pytest.raises(ConfigError, match=msg):
      rules.Rule(*args)


def test_unmatched_modules_stay_fp():
  plan = rules.resolve_rules([(r"mlp\.down_proj$", rules.Rule("rtn", 2, 32))], dream_config(DREAM_TINY_TEST))
  assert plan.quantized() == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
  assert "model.layers.0.self_attn.q_proj -> skip (no rule)" in plan.describe().splitlines()


def test_json_round_trip():
  table = [(r"q_proj", "skip"), (r".*", {"method": "quant_dllm", "bits": 2, "group_size": 32,
                                         "options": {"salient_weight": 3.0, "orders_list": [1, 2]}})]
  plan = rules.resolve_rules(table, LCFG)
  s = plan.to_json()
  d = json.loads(s)
  assert d["modules"]["model.transformer.blocks.0.q_proj"] == "skip"
  assert d["modules"]["model.transformer.blocks.0.k_proj"]["options"] == {"orders_list": [1, 2],
                                                                          "salient_weight": 3.0}
  back = rules.Plan.from_json(s, LCFG)
  assert back.modules == plan.modules
  assert rules.resolve_rules(d["rules"], LCFG).modules == plan.modules  # the JSON table (lists) resolves alike
  other = llada_config(LLADA_TINY_TEST, n_layers=3)
  with pytest.raises(ConfigError, match="config differs"):
    rules.Plan.from_json(s, other)


def test_errors_name_the_culprit():
  with pytest.raises(ConfigError, match=r"entry 1 \('self_attn'\) matches no block linear"):
    rules.resolve_rules([(".*proj", "skip"), ("self_attn", "skip")], LCFG)
  with pytest.raises(ConfigError, match="wte.*never quantized"):
    rules.resolve_rules([("wte", rules.Rule("rtn", 4, 32))], LCFG)
  with pytest.raises(ConfigError, match=r"entry 1 \('q_proj'\) never applies.*entry 0"):
    rules.resolve_rules([(".*", "skip"), ("q_proj", rules.Rule("rtn", 4, 32))], LCFG)
  with pytest.raises(ConfigError, match="invalid regex"):
    rules.resolve_rules([("(", "skip")], LCFG)
  with pytest.raises(ConfigError, match="method 'awq'"):
    rules.resolve_rules([(".*", {"method": "awq"})], LCFG)
  with pytest.raises(ConfigError, match="unknown keys"):
    rules.resolve_rules([(".*", {"method": "rtn", "damp": 0.1})], LCFG)
  with pytest.raises(ConfigError, match="bits"):
    rules.Rule("rtn", 0, 32)
  with pytest.raises(ConfigError, match="group_size"):
    rules.Rule("rtn", 2, -2)  # (-1 is RTN's per-channel grid: accepted)
  with pytest.raises(ConfigError, match="JSON"):
    rules.Rule("rtn", 2, 32, (("f", object()),))
  with pytest.raises(ConfigError, match="not a rule"):
    rules.resolve_rules([(".*", "fp16")], LCFG)
  with pytest.raises(ConfigError, match="embeddings"):
    rules.resolve_rules(rules.default_rules(), LCFG, quantize_embeddings=True)
  with pytest.raises(ConfigError, match="LM head"):
    rules.resolve_rules(rules.default_rules(), LCFG, quantize_head=True)
