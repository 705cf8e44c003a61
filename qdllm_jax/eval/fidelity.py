"""Fidelity of a quantized encoder to its FP source: hidden states, sentence embeddings, similarity structure.

An encoder here is any `states_fn(ids int32 [B, T], attention_mask int32 [B, T]) -> float [B, T, d]` returning the
last hidden states (`model_states_fn` makes one from a pytree model with the `model(ids, attention_mask=...)`
contract). The protocol (protocols.FidelitySpec) fixes the sentences and the masks; all metrics compare a
candidate with the reference (FP) on the same sentences and the same masked positions:

  rel_err/<input>  per sentence s: mean over its real tokens i of ||h_q(s,i) - h_fp(s,i)|| / ||h_fp(s,i)||,
                   then the mean over sentences; <input> "plain" or "mask<t>" (each maskable token of a sentence
                   has been replaced by the tokenizer's [MASK] id, round(t n_s) of its n_s maskable tokens,
                   special tokens never).
  emb_cos          per sentence: cosine of the sentence embeddings (mean pooling over real tokens, then L2
                   normalisation: the sentence-transformers recipe), mean over sentences (plain inputs).
  sim_pearson,     Pearson / Spearman correlation between the off-diagonal entries (i < j) of the candidate's
  sim_spearman     and the reference's cosine-similarity matrices of the sentence embeddings.

Paired statistics (`paired_fidelity`) of candidate b minus candidate a (a = the reference itself by default, whose
values are 0 / 1 / 1): for rel_err and emb_cos, per-sentence differences d_s, delta = mean d, se = sd(d) / sqrt(n)
(eval.paired.paired_mean); for the similarity correlations, which are not sentence means, the delta of the two
correlations with a delete-a-group jackknife standard error over G groups of sentences (sentence k in group k mod G,
G = 32 by default; G = N is leave-one-out):
  se = sqrt((G - 1) / G * sum_g (delta_(g) - mean_g delta_(g))^2),
delta_(g) computed with group g's rows and columns removed from all three similarity matrices.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from scipy import stats as sp_stats

from qdllm_jax.data import corpus
from qdllm_jax.errors import ConfigError
from qdllm_jax.eval.paired import paired_mean, paired_stat

SIM_METRICS = ("sim_pearson", "sim_spearman")


# ------------------------------------------------------------------------------------------ inputs
def heldout_sentences(n: int, min_words: int = 8, split: str = "heldout") -> list[str]:
  """`n` distinct verses of the shipped corpus's held-out chapters (corpus.load_splits), evenly spaced in file
  order, each with >= min_words words and none equal to any verse of a training chapter, so no sentence can
  occur in calibration windows drawn from the training split. Raises ConfigError when fewer exist."""
  splits = corpus.load_splits()
  if split not in splits:
    raise ConfigError(f"corpus split {split!r} is unknown; expected one of {sorted(splits)}.")
  train = {v for d in splits["train"] for v in d.split("\n")[1:]}
  seen, pool = set(), []
  for doc in splits[split]:
    for v in doc.split("\n")[1:]:  # the first line is the chapter title
      if len(v.split()) >= min_words and v not in seen and (split == "train" or v not in train):
        seen.add(v)
        pool.append(v)
  if len(pool) < n:
    raise ConfigError(f"the {split} split has {len(pool)} usable sentences (>= {min_words} words), fewer than "
                      f"n_sentences={n}; lower n_sentences or min_words.")
  return [pool[i] for i in np.linspace(0, len(pool) - 1, n).round().astype(int)]


def encode(tok, sentences: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [N, T], attention_mask int32 [N, T]): the tokenizer's own framing ([CLS] .. [SEP] for BERT),
  truncated to max_tokens, right-padded with its pad id to T = the longest row rounded up to a multiple of 8."""
  enc = tok(list(sentences), truncation=True, max_length=max_tokens, padding="longest", return_tensors="np")
  ids, attn = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
  t = -(-ids.shape[1] // 8) * 8
  pad = t - ids.shape[1]
  return (np.pad(ids, ((0, 0), (0, pad)), constant_values=tok.pad_token_id or 0),
          np.pad(attn, ((0, 0), (0, pad))))


def mask_tokens(ids: np.ndarray, attn: np.ndarray, rate: float, mask_id: int, special_ids, rng) -> np.ndarray:
  """ids [N, T] with, in each row, round(rate * n) of its n maskable tokens (real, not in special_ids) replaced
  by mask_id, chosen uniformly without replacement by `rng` (numpy Generator); other positions unchanged."""
  out = ids.copy()
  maskable = (attn > 0) & ~np.isin(ids, np.asarray(list(special_ids), np.int64))
  for r in range(ids.shape[0]):
    pos = np.flatnonzero(maskable[r])
    k = int(round(rate * pos.size))
    out[r, rng.choice(pos, size=k, replace=False)] = mask_id
  return out


def fidelity_inputs(tok, spec, *, seed: int, mask_id: int) -> dict:
  """{"plain": (ids, attn), "mask<t>": (masked ids, attn) per t in spec.mask_rates}: the protocol's sentences
  (heldout_sentences), encoded (encode) and masked (mask_tokens with rng default_rng([seed, round(1000 t)]))."""
  if mask_id is None:
    raise ConfigError("the fidelity protocol masks tokens but the model has no mask id; set mask_token_id.")
  ids, attn = encode(tok, heldout_sentences(spec.n_sentences, spec.min_words, spec.corpus_split), spec.max_tokens)
  out = {"plain": (ids, attn)}
  for t in spec.mask_rates:
    rng = np.random.default_rng([seed, int(round(1000 * t))])
    out[f"mask{t:g}"] = (mask_tokens(ids, attn, t, mask_id, tok.all_special_ids, rng), attn)
  return out


# ------------------------------------------------------------------------------------------ states
@jax.jit
def _apply(model, ids, attn):
  return model(ids, attention_mask=attn)


def model_states_fn(model):
  """states_fn of a pytree model called as model(ids, attention_mask=attn) -> [B, T, d] (jitted, params traced)."""
  return functools.partial(_apply, model)


def encode_states(states_fn, inputs: dict, batch: int = 64) -> dict:
  """{name: float32 [N, T, d]}: states_fn on every input set of `fidelity_inputs`, `batch` rows per call.

  Rows are taken in order of length and each call is cut to its longest row (rounded up to 8 columns), so
  right padding costs little; positions past a row's length hold 0 (they are padding, which every metric
  ignores). For an encoder whose real-token states do not depend on the padding (a key-masked attention), the
  result equals one call on the whole padded batch up to float rounding."""
  out = {}
  for name, (ids, attn) in inputs.items():
    lengths = np.asarray(attn).sum(1)
    order = np.argsort(lengths, kind="stable")
    res = None
    for i in range(0, ids.shape[0], batch):
      rows = order[i:i + batch]
      t = min(ids.shape[1], max(8, -(-int(lengths[rows].max()) // 8) * 8))
      h = np.asarray(states_fn(ids[rows, :t], attn[rows, :t]), np.float32)
      if res is None:
        res = np.zeros(ids.shape + h.shape[2:], np.float32)
      res[rows, :t] = h * (attn[rows, :t, None] > 0)
    out[name] = res
  return out


# ------------------------------------------------------------------------------------------ metrics
def token_rel_err(h_ref, h_cand, attn) -> np.ndarray:
  """float64 [N]: per sentence, the mean over real tokens of ||h_cand - h_ref|| / ||h_ref|| (h [N, T, d])."""
  h_ref, h_cand = np.asarray(h_ref, np.float64), np.asarray(h_cand, np.float64)
  r = np.linalg.norm(h_cand - h_ref, axis=-1) / np.maximum(np.linalg.norm(h_ref, axis=-1), 1e-30)
  m = np.asarray(attn, np.float64)
  return (r * m).sum(1) / m.sum(1)


def sentence_embeddings(h, attn) -> np.ndarray:
  """float64 [N, d]: mean of h [N, T, d] over the real tokens (attn > 0), L2-normalised."""
  m = np.asarray(attn, np.float64)[..., None]
  e = (np.asarray(h, np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def _offdiag(e, keep=None):
  if keep is not None:
    e = e[keep]
  iu = np.triu_indices(e.shape[0], 1)
  return (e @ e.T)[iu]


def similarity_correlations(e_ref, e_cand, keep=None) -> dict:
  """{"sim_pearson", "sim_spearman"}: correlations of the i < j entries of e_ref e_ref^T and e_cand e_cand^T
  (e [N, d], unit rows); keep: optional row indices to restrict both to."""
  a, b = _offdiag(e_ref, keep), _offdiag(e_cand, keep)
  return {"sim_pearson": float(np.corrcoef(a, b)[0, 1]), "sim_spearman": float(sp_stats.spearmanr(a, b)[0])}


def fidelity_values(ref_states: dict, cand_states: dict, inputs: dict) -> dict:
  """Per-sentence values of a candidate against the reference: {"rel_err/<input>": [N], "emb_cos": [N],
  "emb": [N, d] the candidate's sentence embeddings, "emb_ref": [N, d]} (plain inputs for the embeddings)."""
  out = {f"rel_err/{k}": token_rel_err(ref_states[k], cand_states[k], inputs[k][1]) for k in inputs}
  attn = inputs["plain"][1]
  e_ref, e = sentence_embeddings(ref_states["plain"], attn), sentence_embeddings(cand_states["plain"], attn)
  out.update(emb_cos=np.sum(e_ref * e, -1), emb=e, emb_ref=e_ref)
  return out


def fidelity_metrics(values: dict) -> dict:
  """Flat {metric: float}: sentence means of rel_err/* and emb_cos, and the similarity correlations."""
  out = {k: float(np.mean(v)) for k, v in values.items() if k.startswith("rel_err/") or k == "emb_cos"}
  return dict(out, **similarity_correlations(values["emb_ref"], values["emb"]))


def _identity(values: dict) -> dict:
  """The reference's own per-sentence values (rel_err 0, cosine 1, embeddings = the reference's)."""
  out = {k: np.zeros_like(v) for k, v in values.items() if k.startswith("rel_err/")}
  return dict(out, emb_cos=np.ones_like(values["emb_cos"]), emb=values["emb_ref"], emb_ref=values["emb_ref"])


def jackknife_sim_delta(e_ref, e_a, e_b, groups: int = 32) -> dict:
  """{metric: stat} for sim_pearson / sim_spearman: delta = corr(ref, b) - corr(ref, a) over all N sentences, se
  its delete-a-group jackknife over G = min(groups, N) groups (sentence k in group k mod G; G = N is the
  leave-one-out jackknife): se = sqrt((G - 1) / G * sum_g (delta_(g) - mean_g delta_(g))^2), delta_(g) computed
  without group g's rows and columns; t = delta / se; "n" is N."""
  n = e_ref.shape[0]
  g_count = min(groups, n)
  if g_count < 2:
    raise ConfigError(f"a similarity-structure comparison needs >= 2 sentences; got {n}.")
  full_a, full_b = similarity_correlations(e_ref, e_a), similarity_correlations(e_ref, e_b)
  loo = {k: np.empty(g_count) for k in SIM_METRICS}
  for g in range(g_count):
    keep = np.flatnonzero(np.arange(n) % g_count != g)
    ca, cb = similarity_correlations(e_ref, e_a, keep), similarity_correlations(e_ref, e_b, keep)
    for m in SIM_METRICS:
      loo[m][g] = cb[m] - ca[m]
  return {m: paired_stat(full_b[m] - full_a[m],
                         np.sqrt((g_count - 1) / g_count * np.sum((loo[m] - loo[m].mean()) ** 2)), n)
          for m in SIM_METRICS}


def paired_fidelity(values_b: dict, values_a: dict | None = None, *, groups: int = 32) -> dict:
  """Paired statistics of candidate b minus candidate a ({"delta", "se", "t", "n"} per metric, the module
  docstring); values_a None = the reference itself. Both from fidelity_values against the same reference;
  groups: jackknife groups of the similarity correlations."""
  if values_a is None:
    values_a = _identity(values_b)
  if set(values_a) != set(values_b) or values_a["emb_ref"].shape != values_b["emb_ref"].shape:
    raise ConfigError("the two candidates were scored on different inputs; score both with the same "
                      "fidelity_inputs and reference states.")
  out = {"rel_err": {k.split("/", 1)[1]: paired_mean(values_b[k] - values_a[k])
                     for k in values_b if k.startswith("rel_err/")},
         "emb_cos": paired_mean(values_b["emb_cos"] - values_a["emb_cos"])}
  out.update(jackknife_sim_delta(values_b["emb_ref"], values_a["emb"], values_b["emb"], groups))
  return out


def evaluate_fidelity(ref_fn, cand_fn, tok, spec, *, seed: int, mask_id: int, ref_states: dict | None = None) -> dict:
  """Score candidate `cand_fn` against reference `ref_fn` (states_fns) under FidelitySpec `spec`.

  Returns {"metrics": {"fp": identity metrics, "quantized": candidate metrics}, "comparison": paired_fidelity
  (candidate - reference), "n_sentences", "mask_rates", "tokens"}; ref_states: precomputed encode_states of the
  reference on the same inputs (the FP pass is then skipped)."""
  inputs = fidelity_inputs(tok, spec, seed=seed, mask_id=mask_id)
  ref = ref_states if ref_states is not None else encode_states(ref_fn, inputs, spec.batch)
  vals = fidelity_values(ref, encode_states(cand_fn, inputs, spec.batch), inputs)
  return {"metrics": {"fp": fidelity_metrics(_identity(vals)), "quantized": fidelity_metrics(vals)},
          "comparison": paired_fidelity(vals, groups=spec.jackknife_groups),
          "n_sentences": int(inputs["plain"][0].shape[0]), "mask_rates": list(spec.mask_rates),
          "tokens": int(inputs["plain"][1].sum())}
