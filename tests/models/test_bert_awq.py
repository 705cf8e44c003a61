"""AWQ on BERT: v -> o folded, q/k/v, up and down scaled through online divisors (vector online transforms).

Checked against a float64 NumPy forward of the FP equations (test_bert.np_block) and NumPy closed forms; on the
2-block truncation of the real MiniLM, AWQ W3 g128 against round-to-nearest with the same quantizer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bert_fixtures import padded_ids
from test_bert import np_block, np_layer_norm

from qdllm_jax.baselines import awq, weight_activation
from qdllm_jax.calib.text_windows import windows_from_texts
from qdllm_jax.data import corpus
from qdllm_jax.models import bert, hf_checkpoint, hf_tokenizer
from qdllm_jax.models.act_fake_quant import ONLINE, online_transform
from qdllm_jax.models.families import config_from_hf
from qdllm_jax.models.model import Model

SMALL = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 1200, "hidden_size": 32,
         "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64, "max_position_embeddings": 24,
         "layer_norm_eps": 1e-12}


def small_bert(seed=0):
  """A random 2-block BERT (d 32, F 64) whose LN_1 output carries one outlier channel (weight x 20)."""
  cfg = config_from_hf(SMALL)
  rng = np.random.default_rng(seed)
  shapes = bert.param_shapes(cfg)

  def leaf(name, shape):
    if "norm" in name and not name.endswith("bias"):
      return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return ((0.1 if name.endswith("bias") else 0.2) * rng.standard_normal(shape)).astype(np.float32)

  params = {k: leaf(k, s) for k, s in shapes.items() if k != "blocks"}
  params["blocks"] = [{k: leaf(k, s) for k, s in b.items()} for b in shapes["blocks"]]
  for b in params["blocks"]:
    b["attn_norm"][3] *= 20.0
  return cfg, jax.tree.map(jnp.asarray, params)


def np_forward(params, cfg, ids, mask):
  e = {k: np.asarray(params[k], np.float64) for k in bert.TOP_NAMES}
  x = np_layer_norm(e["embed"][ids] + e["pos_embed"][:ids.shape[1]] + e["type_embed"][0], e["embed_norm"],
                    e["embed_norm_bias"], cfg.norm_eps)
  for p in params["blocks"]:
    x = np_block(p, x, mask.astype(bool), cfg.n_heads, cfg.norm_eps)
  return x


def test_online_vector_is_diagonal_matrix():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 7)).astype(np.float32)
  r = rng.uniform(0.2, 3.0, 7).astype(np.float32)
  got = np.asarray(online_transform(jnp.asarray(x), jnp.asarray(r)))
  np.testing.assert_allclose(got, x.astype(np.float64) @ np.diag(r.astype(np.float64)), rtol=1e-6)


def test_bert_scale_groups_and_fold_identity():
  """Random scales on every group: v -> o folded into v's rows/bias, the rest online divisors; same function."""
  cfg, params = small_bert()
  groups = awq.scale_groups(bert.FAMILY)
  assert groups == (("qkv", None, ("q", "k", "v")), ("o", "v", ("o",)), ("up", None, ("up",)),
                    ("down", None, ("down",)))
  rng = np.random.default_rng(1)
  sc = [{t: jnp.asarray(rng.uniform(0.3, 3.0, params["blocks"][0][n[0]].shape[1]), jnp.float32)
         for t, _, n in groups} for _ in params["blocks"]]
  folded = dict(params, blocks=[awq.fold_scales(p, s, groups) for p, s in zip(params["blocks"], sc)])
  b0, s0 = folded["blocks"][0], sc[0]
  assert set(b0[ONLINE]) == {"qkv", "up", "down"}
  np.testing.assert_allclose(np.asarray(b0[ONLINE]["down"]), 1.0 / np.asarray(s0["down"]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(b0["v_bias"]), np.asarray(params["blocks"][0]["v_bias"]) / np.asarray(s0["o"]),
                             rtol=1e-5)
  ids, mask = padded_ids(np.random.default_rng(2), 3, 10, vocab=1200)
  want = np_forward(params, cfg, ids, mask)
  got = np.asarray(Model(folded, cfg)(ids, mask))
  np.testing.assert_allclose(got, want, atol=2e-4)


def test_awq_unquantized_keeps_the_function():
  """awq(quantize=False, clip=False) on a small BERT: searched scales (non-trivial on the outlier channel) are
  folded / kept online, and the model computes the FP function."""
  cfg, params = small_bert(seed=4)
  calib = np.random.default_rng(5).integers(1, 1200, (4, 16)).astype(np.int32)
  qp, ratios = awq.awq(params, cfg, calib, w_bits=2, group_size=16, n_grid=10, clip=False, quantize=False)
  assert set(ratios[0]) == {"qkv", "o", "up", "down"}
  assert max(r["up"] for r in ratios) > 0  # the outlier channel of LN_1's output is scaled
  assert not np.allclose(np.asarray(qp["blocks"][0]["up"]), np.asarray(params["blocks"][0]["up"]))
  ids, mask = padded_ids(np.random.default_rng(6), 2, 12, vocab=1200)
  np.testing.assert_allclose(np.asarray(Model(qp, cfg)(ids, mask)), np_forward(params, cfg, ids, mask), atol=2e-4)


def test_awq_w3_beats_rtn_on_real_minilm(minilm2_dir):
  """Real MiniLM (2 blocks), KJV text: AWQ W3 g128 has lower held-out hidden-state error than round-to-nearest
  with the same quantizer (llm-awq's, no scaling, no clipping) and than the package's RTN W3 g128."""
  m = hf_checkpoint.load_pretrained(minilm2_dir)
  cfg = m.config
  tok = hf_tokenizer.load_tokenizer(minilm2_dir)
  splits = corpus.load_splits()
  calib = windows_from_texts(splits["train"], tok, 8, 64, 0)
  held = windows_from_texts(splits["heldout"], tok, 16, 64, 1)
  qa, ratios = awq.awq(m.params, cfg, calib, w_bits=3, group_size=128)
  assert any(r[g] > 0 for r in ratios for g in r)
  same_q = dict(m.params, blocks=[dict(p, **{n: awq.pseudo_quantize(p[n], 3, 128) for n in bert.FAMILY.linears})
                                  for p in m.params["blocks"]])
  rtn = weight_activation.fake_quant_weights(m.params, 3, group_size=128)
  fp = np.asarray(m(held), np.float64)

  def rel(params):
    out = np.asarray(Model(params, cfg)(held), np.float64)
    return float(np.mean(np.linalg.norm(out - fp, axis=-1) / np.linalg.norm(fp, axis=-1)))

  e_awq, e_same, e_rtn = rel(qa), rel(same_q), rel(rtn)
  assert e_awq < 0.9 * min(e_same, e_rtn), (e_awq, e_same, e_rtn)


def test_pack_weight_matches_numpy_grid():
  """pack_weight: llm-awq's grid with the scale rounded to float16 first (NumPy), codes / scales / zeros stored."""
  rng = np.random.default_rng(8)
  w = rng.standard_normal((6, 64)).astype(np.float32)
  w[:, 9] *= 8.0
  qw = awq.pack_weight(jnp.asarray(w), 3, 32)
  assert abs(qw.bits_per_weight - (3 + (16 + 8) / 32)) < 1e-9 and qw.scales.dtype == jnp.float16
  wg = w.reshape(6, 2, 32)
  lo, hi = wg.min(-1, keepdims=True), wg.max(-1, keepdims=True)
  s = (np.maximum(hi - lo, 1e-5) / 7).astype(np.float16).astype(np.float32)
  z = np.clip(-np.round(lo / s), 0, 7)
  want = (s * (np.clip(np.round(wg / s) + z, 0, 7) - z)).reshape(6, 64)
  np.testing.assert_allclose(np.asarray(qw.dequantize()), want, atol=1e-6)


def test_study_refuses_an_encoder_before_loading(minilm2_dir, tmp_path, capsys, monkeypatch):
  """The study scores dLLM task protocols; an AWQ entry on BERT is refused by name, before any loading."""
  import os

  from qdllm_jax import study
  monkeypatch.setattr(hf_checkpoint, "load_pretrained", lambda *a, **k: pytest.fail("loaded before validating"))
  cfg = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "study_tiny.py")
  argv = ["--config", cfg, "--workdir", str(tmp_path), f"--config.model_path={minilm2_dir}",
          "--config.entries=fp,awq:w3a16"]
  assert study.main(argv) == 2
  assert "'bert' model" in capsys.readouterr().err
