"""`evaluate(model, tok, "tiny")`: score a float or quantized model under a shipped-data protocol.

Metrics (formulas in docs/evaluation.md), each per family and over all examples ("all"):
  * held-out ELBO perplexity exp(sum_w B_w / sum_w N_w), B_w = `elbo_nll` of corpus window w (nats);
  * MC accuracy (argmax_k of `llada_loglikelihood`, the official estimator) and the choice NLL
    mean_e -log softmax_k(score)[label] (a proper score that still moves when accuracy saturates);
  * generation exact match (`llada_generate`, decoded to the first EOS, stripped) and the answer NLL
    sum_e B(answer region_e | prompt_e) / sum_e N_e (nats per token; answer_nll_mc > 0).
Fixed shapes (one compile per task group): MC pairs right-padded, generation prompts left-padded with
attention_mask, perplexity windows of one length. Keys: fold_in(key(seed), 0 | 1 | 2 | 3) for perplexity, MC,
generation and answer NLL, so a result is deterministic given the seed.
The ELBO estimator is eval/elbo.py's `elbo_nll`.
"""
from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.data import corpus, sequences, tasks
from qdllm_jax.errors import ConfigError
from qdllm_jax.eval import protocols as protocols_lib
from qdllm_jax.eval.elbo import ElboResult, elbo_nll
from qdllm_jax.eval.likelihood import llada_loglikelihood
from qdllm_jax.sampling.llada_sampler import gumbel_precision_check, llada_generate


# ------------------------------------------------------------------------------------------ ELBO perplexity
def corpus_windows(tok, spec: protocols_lib.PerplexitySpec) -> np.ndarray:
  """int32 [W, window]: `spec.n_windows` evenly spaced non-overlapping windows of the encoded corpus split
  (sequences.encode_stream: [BOS] doc [EOS] ...); window k of the stream is tokens [k w, (k + 1) w)."""
  stream = sequences.encode_stream(tok, corpus.load_splits()[spec.corpus_split])
  n_all = stream.size // spec.window
  if n_all < 1:
    raise ConfigError(f"the {spec.corpus_split} stream has {stream.size} tokens, fewer than window={spec.window}.")
  n = n_all if spec.n_windows is None else min(spec.n_windows, n_all)
  ks = np.unique(np.floor(np.linspace(0, n_all - 1, n)).astype(int))
  return np.stack([stream[k * spec.window:(k + 1) * spec.window] for k in ks]).astype(np.int32)


def perplexity_summary(res: ElboResult) -> dict:
  """{'elbo_ppl': exp(sum B / sum N), 'nats_per_token': sum B / sum N, 'stderr_nats_per_token':
  sqrt(sum se_w^2) / sum N, 'n_windows', 'n_tokens'} from per-window results."""
  n_tok = int(res.n_tokens.sum())
  nats = float(res.nll_bound.sum()) / n_tok
  return {"elbo_ppl": float(np.exp(nats)), "nats_per_token": nats,
          "stderr_nats_per_token": float(np.sqrt(np.sum(res.nll_stderr ** 2)) / n_tok),
          "n_windows": int(res.nll_bound.size), "n_tokens": n_tok}


def choice_accuracy(scores, labels) -> float:
  """mean_e [argmax_k scores[e][k] == labels[e]] (ties -> the lowest k, as np.argmax and lm-eval)."""
  if len(scores) != len(labels) or not len(labels):
    raise ConfigError(f"{len(scores)} score lists for {len(labels)} labels; expected one per example (>= 1).")
  return float(np.mean([int(np.argmax(s)) == int(y) for s, y in zip(scores, labels)]))


def choice_nll(scores, labels) -> float:
  """mean_e -log softmax_k(scores[e])[labels[e]]: the NLL (nats) of the right choice under the choice distribution."""
  return float(np.mean([np.logaddexp.reduce(np.asarray(s, np.float64)) - s[int(y)] for s, y in zip(scores, labels)]))


def normalize_answer(text: str) -> str:
  """The exact-match normalisation: surrounding whitespace stripped (as lm-eval's default)."""
  return text.strip()


def exact_match(prediction: str, reference: str) -> bool:
  """normalize_answer(prediction) == normalize_answer(reference)."""
  return normalize_answer(prediction) == normalize_answer(reference)


def _by_family(hits: dict) -> dict:
  out = {f: float(np.mean(h)) for f, h in sorted(hits.items())}
  out["all"] = float(np.mean([x for h in hits.values() for x in h]))
  return out


def _select(examples, names, limit):
  chosen = {n: [e for e in examples if e.family == n][:limit] for n in names}
  empty = [n for n, exs in chosen.items() if not exs]
  if empty:
    raise ConfigError(f"task families {empty} have no examples in the shipped eval set; expected names from "
                      f"{sorted({e.family for e in examples})}.")
  return chosen


def _groups(specs, fields):
  """[(settings tuple, [task names])] of the specs with equal `fields`, sorted (one compiled call per group)."""
  groups = collections.defaultdict(list)
  for t in specs:
    groups[tuple(getattr(t, f) for f in fields)].append(t.name)
  return sorted(groups.items())


def score_multiple_choice(model, tok, examples_by_task: dict, task_specs, *, mask_id, key, rows_per_call=1024):
  """Per-example choice log-likelihoods via llada_loglikelihood, tasks with equal MC settings in one call.

  examples_by_task: {name: [MCExample]}; task_specs: LikelihoodTask per name. Returns {name: [float64 [K]]}."""
  out = {}
  for g, ((mc_num, b, cfg), names) in enumerate(_groups(task_specs, ("mc_num", "mc_batch", "cfg_scale"))):
    ctx, cont, owner = [], [], []
    for n in names:
      for j, ex in enumerate(examples_by_task[n]):
        for ch in ex.choices:
          p, c = sequences.mc_ids(tok, ex.prompt, ch)
          ctx.append(p), cont.append(c), owner.append((n, j))
    n_calls = -(-len(ctx) * b // rows_per_call)
    ll = llada_loglikelihood(model, ctx, cont, mask_id=mask_id, key=jax.random.fold_in(key, g), mc_num=mc_num,
                             batch_size=b, cfg_scale=cfg, pad_id=tok.eos_token_id,
                             pairs_per_call=-(-len(ctx) // n_calls))
    for n in names:
      out[n] = [[] for _ in examples_by_task[n]]
    for (n, j), v in zip(owner, np.asarray(ll)):
      out[n][j].append(float(v))
  return {n: [np.asarray(s) for s in v] for n, v in out.items()}


def left_pad(seqs, pad_id) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [B, P], attention_mask int32 [B, P]): sequences left-padded with pad_id to the longest."""
  width = max(len(s) for s in seqs)
  ids, am = np.full((len(seqs), width), pad_id, np.int32), np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    ids[i, width - len(s):], am[i, width - len(s):] = s, 1
  return ids, am


def generate_answers(model, tok, examples_by_task: dict, task_specs, *, mask_id, key) -> dict:
  """Generated token ids per example via llada_generate (left-padded batch per group of equal settings).

  Returns {name: int32 [n_examples, gen_length]} (the generated region only)."""
  if any(t.sampler != "llada" for t in task_specs):
    raise ConfigError("the shipped-task suite runs the LLaDA sampler; a generation task asks for another one.")
  out = {}
  fields = ("gen_length", "steps", "block_length", "temperature", "cfg_scale", "remasking")
  for g, ((gen_length, steps, block, temp, cfg, remask), names) in enumerate(_groups(task_specs, fields)):
    exs = [(n, e) for n in names for e in examples_by_task[n]]
    ids, am = left_pad([sequences.gen_prompt_ids(tok, e) for _, e in exs], tok.eos_token_id)
    x = np.asarray(llada_generate(model, ids, mask_id=mask_id, steps=steps, gen_length=gen_length,
                                  block_length=block, temperature=temp, cfg_scale=cfg, remasking=remask,
                                  attention_mask=am, key=jax.random.fold_in(key, g), gumbel_dtype="float32"))
    out.update({n: x[[m == n for m, _ in exs], ids.shape[1]:] for n in names})
  return out


def answer_nll(model, tok, examples_by_task: dict, task_specs, *, mask_id, key) -> dict:
  """Answer NLL per family and "all": sum_e B(answer_e | prompt_e) / sum_e N_e in nats per token, the answer being
  the reference tokens + EOS fill to gen_length (the region a sampler decodes). Tasks with equal settings share one
  elbo_nll call; tasks with answer_nll_mc == 0 are skipped ({} if all are)."""
  sums, specs = {}, [t for t in task_specs if t.answer_nll_mc]
  fields = ("answer_nll_mc", "answer_nll_batch", "gen_length")
  for g, ((n_mc, b, gen_length), names) in enumerate(_groups(specs, fields)):
    exs = [(n, e) for n in names for e in examples_by_task[n]]
    answers = [tok(e.answer, add_special_tokens=False).input_ids for _, e in exs]
    too_long = [e.answer for (_, e), a in zip(exs, answers) if len(a) > gen_length]
    if too_long:
      raise ConfigError(f"answers {too_long[:3]} have more than gen_length={gen_length} tokens; raise gen_length.")
    answers = [a + [tok.eos_token_id] * (gen_length - len(a)) for a in answers]
    res = elbo_nll(model, [sequences.gen_prompt_ids(tok, e) for _, e in exs], answers, mask_id=mask_id,
                   key=jax.random.fold_in(key, g), n_mc=n_mc, mc_batch=b, pad_id=tok.eos_token_id, rows_per_call=1024)
    sel = {n: np.array([m == n for m, _ in exs]) for n in names}
    sums.update({n: (float(res.nll_bound[k].sum()), int(res.n_tokens[k].sum())) for n, k in sel.items()})
  if not sums:
    return {}
  out = {n: v / k for n, (v, k) in sorted(sums.items())}
  out["all"] = sum(v for v, _ in sums.values()) / sum(k for _, k in sums.values())
  return out


# ------------------------------------------------------------------------------------------ the suite
def _mask_id(model, tok, mask_id):
  mask_id = next((m for m in (mask_id, getattr(model, "mask_id", None), getattr(tok, "mask_token_id", None))
                  if m is not None), None)
  if mask_id is None:
    raise ConfigError("no mask id: the model has no .mask_id and the tokenizer no mask_token; pass mask_id=.")
  return int(mask_id)


def evaluate(model, tokenizer, protocol="tiny", *, seed=0, key=None, limit=None, mask_id=None,
             return_details=False) -> dict:
  """Score `model` under a shipped-data protocol (default "tiny"); see the module docstring for the metrics.

  Args:
    model: any callable pytree with the Model contract, model(ids int32 [B, T], attention_mask) -> logits.
    tokenizer: the shipped tokenizer (EOS 0 = pad, BOS 1, <|mdm_mask|>).
    protocol: a name in protocols.PROTOCOLS with data == "shipped", or a Protocol.
    seed / key: key = jax.random.key(seed) unless key is given. limit: examples per family (overrides the
      protocol's). return_details: add per-item results (window NLLs and token counts, choice scores and NLLs,
      generated ids, predictions and hits) for `paired.compare`.
  Returns:
    {"protocol": card, "seed", "key_data" (the key's raw words), "metrics": flat {name: float},
     "perplexity": {...}, "multiple_choice":
     {"accuracy": {family: acc, "all": acc}, "n": {...}}, "generation": {"exact_match": {...}, "n": {...}},
     "timing_s": {...}} (+ "details").
  """
  proto = protocols_lib.get_protocol(protocol)
  if proto.data != "shipped":
    raise ConfigError(f"protocol {proto.name!r} runs on lm-eval task data; use "
                      "qdllm_jax.eval.lm_eval_adapter.run_protocol, or pick 'tiny' / 'tiny_smoke' here.")
  arch = getattr(getattr(model, "config", None), "arch", proto.arch)
  if arch != proto.arch:
    raise ConfigError(f"protocol {proto.name!r} is for {proto.arch} models; the model is {arch!r}.")
  mask_id, seed = _mask_id(model, tokenizer, mask_id), (None if key is not None else int(seed))
  key = jax.random.key(seed) if key is None else key
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
    raise ConfigError(f"limit={limit!r}; expected None (the protocol's own limit, {proto.limit}) or a positive "
                      "integer number of examples per family")
  limit = proto.limit if limit is None else int(limit)
  card = dict(proto.card(), limit=limit, mask_id=mask_id, pad_id=tokenizer.eos_token_id)
  raw = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  key_data = [int(v) for v in np.asarray(raw).reshape(-1)]
  result, details = {"protocol": card, "seed": seed, "key_data": key_data, "metrics": {}, "timing_s": {}}, {}
  if proto.perplexity is not None:
    t0, spec = time.time(), proto.perplexity
    wins = corpus_windows(tokenizer, spec)
    res = elbo_nll(model, [[]] * len(wins), list(wins), mask_id=mask_id, key=jax.random.fold_in(key, 0),
                   n_mc=spec.n_mc, mc_batch=spec.mc_batch, control_variate=spec.control_variate,
                   pad_id=tokenizer.eos_token_id)
    result["perplexity"] = perplexity_summary(res)
    result["metrics"].update(elbo_ppl=result["perplexity"]["elbo_ppl"],
                             elbo_nats_per_token=result["perplexity"]["nats_per_token"])
    details["window_nll"], details["window_tokens"] = res.nll_bound, res.n_tokens
    result["timing_s"]["perplexity"] = time.time() - t0
  if proto.likelihood:
    t0 = time.time()
    chosen = _select(tasks.load_eval_set("mc"), [t.name for t in proto.likelihood], limit)
    scores = score_multiple_choice(model, tokenizer, chosen, proto.likelihood, mask_id=mask_id,
                                   key=jax.random.fold_in(key, 1))
    hits = {n: [int(np.argmax(s)) == e.label for s, e in zip(scores[n], chosen[n])] for n in chosen}
    acc = _by_family(hits)
    per_nll = {n: [choice_nll([s], [e.label]) for s, e in zip(scores[n], chosen[n])] for n in chosen}
    nll = _by_family(per_nll)
    result["multiple_choice"] = {"accuracy": acc, "choice_nll": nll, "n": {n: len(h) for n, h in hits.items()}}
    result["metrics"].update({f"mc_{m}/{n}": v for m, d in (("acc", acc), ("nll", nll)) for n, v in d.items()})
    details["choice_scores"] = scores
    details["choice_nll"] = per_nll
    result["timing_s"]["multiple_choice"] = time.time() - t0
  if proto.generation:
    t0 = time.time()
    chosen = _select(tasks.load_eval_set("gen"), [t.name for t in proto.generation], limit)
    gen = generate_answers(model, tokenizer, chosen, proto.generation, mask_id=mask_id,
                           key=jax.random.fold_in(key, 2))
    preds = {n: [sequences.decode_answer(tokenizer, g) for g in gen[n]] for n in gen}
    hits = {n: [exact_match(p, e.answer) for p, e in zip(preds[n], chosen[n])] for n in chosen}
    em = _by_family(hits)
    result["generation"] = {"exact_match": em, "n": {n: len(h) for n, h in hits.items()}}
    result["metrics"].update({f"gen_em/{n}": v for n, v in em.items()})
    details.update(generated_ids=gen, predictions=preds, gen_hits=hits)
    result["timing_s"]["generation"], t0 = time.time() - t0, time.time()
    ans = answer_nll(model, tokenizer, chosen, proto.generation, mask_id=mask_id, key=jax.random.fold_in(key, 3))
    if ans:
      result["generation"]["answer_nll"] = ans
      result["metrics"].update({f"gen_nll/{n}": v for n, v in ans.items()})
      result["timing_s"]["answer_nll"] = time.time() - t0
  result["timing_s"]["total"] = sum(result["timing_s"].values())
  if return_details:
    result["details"] = details
  return result


def gumbel_precision_report(model, tok, *, key, temperatures=(0.5, 1.0), source="tasks", limit=None, mask_id=None,
                            gen_length=sequences.GEN_LEN, steps=None, block_length=None, prompt_len=32):
  """float64 vs float32 Gumbel arithmetic (sampling.gumbel_precision_check) on shipped prompts.

  source "tasks": the generation eval prompts (`limit` per family), left-padded, gen_length GEN_LEN.
  source "corpus": the first `prompt_len` tokens of `limit` (default 32) held-out corpus windows.
  steps / block_length default to gen_length (one block, one token per step). For each temperature T the same
  float64 uniforms drive both runs. Returns {T: {"n_diff" (decoded tokens that differ), "n_generated",
  "first_divergent_step"}, "n_prompts": B}."""
  mask_id = _mask_id(model, tok, mask_id)
  if source == "tasks":
    exs = [e for v in _select(tasks.load_eval_set("gen"), tasks.GEN_FAMILIES, limit).values() for e in v]
    ids, am = left_pad([sequences.gen_prompt_ids(tok, e) for e in exs], tok.eos_token_id)
  elif source == "corpus":
    spec = protocols_lib.PerplexitySpec(window=prompt_len, n_windows=32 if limit is None else limit)
    ids, am = corpus_windows(tok, spec), None
  else:
    raise ConfigError(f"source={source!r}: expected 'tasks' or 'corpus'.")
  out = {"n_prompts": int(ids.shape[0])}
  for i, temp in enumerate(temperatures):
    r = gumbel_precision_check(model, ids, key=jax.random.fold_in(key, i), mask_id=mask_id, temperature=temp,
                               steps=steps or gen_length, gen_length=gen_length,
                               block_length=block_length or gen_length, attention_mask=am)
    out[float(temp)] = {k: r[k] for k in ("n_diff", "n_generated", "first_divergent_step")}
  return out
