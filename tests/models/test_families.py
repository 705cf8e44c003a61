"""The model-family registry: every family's declared tables agree with its own param shapes and config parser."""
import pytest

from qdllm_jax.errors import ConfigError
from qdllm_jax.models import bert, families, open_checkpoint

# a BERT with the MLM head: the presets (MiniLM) have none, so its param names are covered here
BERT_MLM = bert.FAMILY.parse_config({
    "model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32, "num_attention_heads": 4,
    "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 128, "max_position_embeddings": 64}, "c")


@pytest.mark.parametrize("cfg", list(families.PRESETS.values()) + [BERT_MLM],
                         ids=list(families.PRESETS) + ["bert_mlm"])
def test_param_axes_name_every_param_with_one_logical_axis_per_dimension(cfg):
  fam = families.family_of(cfg)
  shapes = fam.param_shapes(cfg)
  named = {k: s for k, s in shapes.items() if k != "blocks"}
  named.update({k: s for blk in shapes["blocks"] for k, s in blk.items()})
  missing = sorted(set(named) - set(fam.param_axes))
  assert not missing, (fam.name, missing)
  assert {k: len(fam.param_axes[k]) for k in named} == {k: len(s) for k, s in named.items()}


def test_every_family_has_a_preset_of_its_own_arch_and_presets_are_looked_up_by_name():
  for name, fam in families.FAMILIES.items():
    assert fam.presets, f"{name} declares no preset"
    for p, cfg in fam.presets.items():
      assert cfg.arch == name and families.preset(p) is cfg
  mini = families.preset("minilm_l6")  # all-MiniLM-L6-v2's published shapes
  assert (mini.d_model, mini.n_layers, mini.n_heads, mini.mlp_hidden, mini.vocab_size, mini.has_head) == \
      (384, 6, 12, 1536, 30522, False)
  with pytest.raises(ConfigError, match=r"model_preset='llada_7b'.*'llada_8b'"):
    families.preset("llada_7b")


def test_minilm_preset_is_the_installed_checkpoint_architecture():
  """The preset equals what the loader reads from the real all-MiniLM-L6-v2 directory (config.json, tensor
  headers and tokenizer's [MASK]), every field but the raw config.json text."""
  pytest.importorskip(bert.MINILM_PACKAGE, reason=f"needs `{bert.MINILM_INSTALL}`")
  real = open_checkpoint(bert.minilm_path()).config
  mini = families.preset("minilm_l6")
  fields = [f for f in real.__dataclass_fields__ if f != "raw"]
  assert {f: getattr(mini, f) for f in fields} == {f: getattr(real, f) for f in fields}
