"""The quantization pipeline on the real MiniLM (1- and 2-block truncations): MCS with [MASK] 103, block-by-block
RTN / GPTQ / Quant-dLLM with propagation, packing, the Orbax checkpoint and load_quantized; outputs checked
against a float64 NumPy forward of the dequantized weights (test_bert.np_block)."""
import jax.numpy as jnp
import numpy as np
import pytest
from bert_fixtures import padded_ids, write_truncated
from test_bert import np_block, np_layer_norm

from qdllm_jax import checkpoint
from qdllm_jax.calib import mcs
from qdllm_jax.errors import ConfigError
from qdllm_jax.models import hf_checkpoint
from qdllm_jax.models.model import Model
from qdllm_jax.quant import pipeline, rules


@pytest.fixture(scope="module")
def minilm1_dir(minilm_dir, tmp_path_factory):
  return write_truncated(minilm_dir, str(tmp_path_factory.mktemp("minilm1")), n_layers=1)


def np_forward(params, cfg, ids, mask):
  e = {k: np.asarray(params[k], np.float64) for k in ("embed", "pos_embed", "type_embed", "embed_norm",
                                                       "embed_norm_bias")}
  t = ids.shape[1]
  x = np_layer_norm(e["embed"][ids] + e["pos_embed"][:t] + e["type_embed"][0], e["embed_norm"],
                    e["embed_norm_bias"], cfg.norm_eps)
  for blk in params["blocks"]:
    x = np_block(pipeline.dense_block(blk), x, mask.astype(bool), cfg.n_heads, cfg.norm_eps)
  return x


def test_mcs_uses_the_tokenizer_mask(minilm1_dir):
  cfg = hf_checkpoint.open_checkpoint(minilm1_dir).config
  ids = np.random.default_rng(0).integers(999, 30000, (16, 24)).astype(np.int32)
  got = np.asarray(mcs.calibration_inputs(ids, cfg))
  masked = got != ids
  assert cfg.mask_id == 103 and np.all(got[masked] == 103) and 0.2 < masked.mean() < 0.8
  assert masked[:, :6].sum() == 0  # the visible prefix (0.25 of 24)


def _check_quantized(reader, table, tmp_path):
  """quantize_model -> outputs vs the NumPy forward of the dequantized weights -> save/load bit-exact."""
  cfg = reader.config
  ids = np.random.default_rng(1).integers(999, 30000, (8, 32)).astype(np.int32)
  params, report = pipeline.quantize_model(reader, mcs.calibration_inputs(ids, cfg), table)
  x, mask = padded_ids(np.random.default_rng(2), 4, 20)
  q = Model(params, cfg)(x, mask)
  np.testing.assert_allclose(np.asarray(q), np_forward(params, cfg, x, mask), atol=2e-4)
  fp = np_forward(reader.load_params(numpy=True), cfg, x, mask)
  assert np.abs(np.asarray(q) - fp).max() > 1e-3  # the weights did change
  path = checkpoint.save_quantized(str(tmp_path / "q"), params, cfg, tokenizer_from=reader.path)
  loaded = checkpoint.load_quantized(path)
  assert (loaded.config.mask_id, loaded.config.has_head, loaded.config.d_model) == (103, False, 384)
  np.testing.assert_array_equal(np.asarray(loaded(x, mask)), np.asarray(q))
  return report


def test_rtn_quantize_save_load(minilm1_dir, tmp_path):
  report = _check_quantized(hf_checkpoint.open_checkpoint(minilm1_dir), rules.default_rules("rtn", 3, 128),
                            tmp_path)
  assert [e["name"] for e in report] == ["q", "k", "v", "o", "up", "down"]


@pytest.mark.slow
def test_quant_dllm_gptq_quantize_save_load(minilm2_dir, tmp_path):
  table = [(r"attention\.self", rules.Rule("quant_dllm", 2, 128)), (r".*", rules.Rule("gptq", 2, 128))]
  report = _check_quantized(hf_checkpoint.open_checkpoint(minilm2_dir), table, tmp_path)
  assert [(e["layer"], e["name"], e["method"]) for e in report][:6] == [
      (0, "q", "quant_dllm"), (0, "k", "quant_dllm"), (0, "v", "quant_dllm"), (0, "o", "gptq"), (0, "up", "gptq"),
      (0, "down", "gptq")]


def test_decoder_module_order_refused(minilm1_dir):
  reader = hf_checkpoint.open_checkpoint(minilm1_dir)
  ids = np.zeros((2, 8), np.int32) + 1000
  with pytest.raises(ConfigError, match="module_order"):
    pipeline.quantize_model(reader, jnp.asarray(ids), rules.default_rules("rtn", 4, 128), module_order="llada_runner")
