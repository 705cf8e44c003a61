"""The model-family registry: every family's declared tables agree with its own param shapes and config parser,
and a family added as docs/model_families.md says runs end to end."""
import jax
import numpy as np
import pytest

from qdllm_jax import checkpoint, config_check, plan, run_configs
from qdllm_jax.errors import ConfigError
from qdllm_jax.models import Model, bert, families, hf, llada, open_checkpoint, save_pretrained, transformer
from qdllm_jax.models.model_config import ModelConfig, freeze
from qdllm_jax.quant import api, pipeline, rules

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


@pytest.mark.parametrize("cfg", list(families.PRESETS.values()) + [BERT_MLM],
                         ids=list(families.PRESETS) + ["bert_mlm"])
def test_block_linears_have_distinct_module_paths(cfg):
  """Rules tables and reports name a linear by its tensor name minus the last component (hf.module_path)."""
  fam = families.family_of(cfg)
  paths = [hf.module_path(cfg, 1, n) for n in fam.linears]
  assert len(set(paths)) == len(paths) and all(p in hf.block_names(cfg, 1)[n] for p, n in zip(paths, fam.linears))


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


# ------------------------------------------------------------------- a family added the documented way
TOY_BLOCK = {"attn_norm": "ln1.weight", "q": "attn.wq.weight", "k": "attn.wk.weight", "v": "attn.wv.weight",
             "o": "attn.wo.weight", "ff_norm": "ln2.weight", "gate": "mlp.w1.weight", "up": "mlp.w3.weight",
             "down": "mlp.w2.weight"}
TOY_TOP = {"embed": "tok.weight", "final_norm": "norm.weight", "head": "out.weight"}


def _toy_config(d, path):
  """A config.json with its own field names, parsed the way a family module does."""
  return ModelConfig(arch="toy", vocab_size=d["vocab"], hf_vocab_size=d["vocab"], d_model=d["width"],
                     n_layers=d["depth"], n_heads=d["heads"], n_kv_heads=d["heads"], head_dim=d["width"] // d["heads"],
                     mlp_hidden=d["ffn"], rope_theta=1e4, norm_eps=1e-5, mask_id=d["mask"], eos_id=0, pad_id=0,
                     max_seq_len=64, raw=freeze(dict(d)))


def test_a_new_family_is_one_module_plus_its_registry_entry(monkeypatch, tmp_path):
  """A family declared like models/llada.py (a config parser, tensor names; the shared decoder) and registered in
  FAMILIES (with the model_type table derived from it) loads, calibrates, quantizes, saves and reloads with no
  other change, and plans without weights. Reference: the same params quantized directly (api.quantize_weight
  per linear: RTN needs no H)."""
  toy = llada.decoder_family("toy", ("toy",), _toy_config, TOY_TOP, TOY_BLOCK, "layers.{}.", calib_seed=7,
                             presets={}, sampler="llada", description="a toy decoder")
  monkeypatch.setitem(families.FAMILIES, "toy", toy)
  monkeypatch.setitem(families._BY_MODEL_TYPE, "toy", toy)
  cfg = families.config_from_hf({"model_type": "toy", "vocab": 64, "width": 32, "depth": 2, "heads": 4, "ffn": 64,
                                 "mask": 63})
  params = transformer.init_params(cfg, jax.random.key(0), std=0.2)
  src = save_pretrained(params, cfg, str(tmp_path / "toy"))
  reader = open_checkpoint(src)
  assert "layers.1.mlp.w2.weight" in reader.tensors and reader.config == cfg
  ids = np.random.default_rng(0).integers(0, 63, (4, 16)).astype(np.int32)
  qparams, report = pipeline.quantize_model(reader, ids, rules.default_rules("rtn", 4, 32), chunk_size=4)
  assert [(e["layer"], e["module"]) for e in report[:2]] == [(0, "layers.0.attn.wq"), (0, "layers.0.attn.wk")]
  for b in range(2):
    for n in toy.linears:
      want = api.quantize_weight(params["blocks"][b][n], None, method="rtn", bits=4, group_size=32)
      np.testing.assert_array_equal(np.asarray(qparams["blocks"][b][n].dequantize()), np.asarray(want.dequantize()))
  spec = config_check.validate(run_configs.model_config(**{
      "model_path": src, "calib.seqlen": 16, "quant.group_size": 32, "eval.protocol": "",
      "plan.hardware": "tpu_v5e_8"}), dry_run=True)
  text, rp = plan.dry_run(spec)  # planned from its config.json, sharded by the decoder's param_axes
  assert "toy, 2 blocks" in text and rp.n_quantized == 14 and rp.fits
  loaded = checkpoint.load_quantized(checkpoint.save_quantized(str(tmp_path / "q"), qparams, cfg))
  assert loaded.config == cfg
  np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(Model(params=qparams, config=cfg)(ids)))
