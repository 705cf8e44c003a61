"""lm-evaluation-harness (lm-eval 0.4.x) model class for qdllm-jax LLaDA / Dream models (float or quantized).

    pip install lm-eval            # optional extra: qdllm-jax[eval]
    lm_eval --model qdllm_llada --model_args pretrained=qdllm_jax/shipped/tiny-llada,mc_num=128 --tasks arc_easy
    run_protocol(model, tok, "quant_dllm_llada", include_path=...)   # every task of a paper protocol

Request types (lm-eval `LM` contract):
  * loglikelihood (context, continuation) -> (log p(cont | ctx), is_greedy): LLaDA `llada_loglikelihood`
    (Dream: `dream_loglikelihood` with EOS appended to the continuation, as the QDLM harness), mc_num /
    mc_batch samples; is_greedy from `llada_greedy_check` when greedy_check=True, else False (both papers).
    Tokenisation as the LLaDA harness: trailing spaces of the context move to the continuation, the
    continuation is whole[len(enc(context)):] of enc(context + continuation); BOS prepended if add_bos_token.
  * loglikelihood_rolling (text,) -> -B: lm-eval's disjoint rolling windows of max_length tokens, each scored
    with the ELBO bound B (elbo.elbo_nll, LLaDA form + control variate; Dream: its MC estimator), summed.
    It is a lower bound on log p(text), so perplexities computed from it are upper bounds.
  * generate_until (context, gen_kwargs) -> text: `llada_generate` / `dream_generate` with this object's
    sampler settings (gen_kwargs' max_gen_toks/temperature are ignored, as in the LLaDA harness), decoded
    up to the first EOS and cut at the first `until` string. Prompts are left-padded in batches of
    batch_size to a multiple of `bucket` tokens (fixed shapes: few compiles).
Keys: call number k of a method uses fold_in(fold_in(key(seed), method), k), so a run is reproducible.
"""
from __future__ import annotations

import jax
import numpy as np

from qdllm_jax.errors import ConfigError
from qdllm_jax.eval import protocols as protocols_lib
from qdllm_jax.eval.elbo import elbo_nll
from qdllm_jax.eval.likelihood import dream_loglikelihood, llada_greedy_check, llada_loglikelihood
from qdllm_jax.models import load_pretrained, load_tokenizer
from qdllm_jax.models.families import family_of
from qdllm_jax.sampling import dream_generate, llada_generate

try:
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the optional extra
  raise ConfigError("lm-eval is not installed; `pip install lm-eval` (the qdllm-jax[eval] extra) to use "
                    "qdllm_jax.eval.lm_eval_adapter.") from e

_METHODS = {"loglikelihood": 0, "loglikelihood_rolling": 1, "generate_until": 2}
_IGNORED = ("device", "max_batch_size", "trust_remote_code", "parallelize")


@register_model("qdllm_llada", "qdllm_dream", "qdllm")
class QdllmLM(LM):
  """lm-eval LM over a qdllm-jax model; construct with pretrained=PATH or model=Model, tokenizer=TOKENIZER."""

  def __init__(self, pretrained=None, model=None, tokenizer=None, *, mc_num=128, mc_batch=8, cfg_scale=0.0,
               greedy_check=False, gen_length=128, steps=128, block_length=128, temperature=0.0,
               remasking="low_confidence", top_p=None, alg="origin", ignore_cfg=False, add_bos_token=True,
               max_length=None, batch_size=8, bucket=32, rows_per_call=256, elbo_n_mc=64, elbo_mc_batch=8,
               seed=0, mask_id=None, dtype=None, **kwargs):
    super().__init__()
    unknown = sorted(k for k in kwargs if k not in _IGNORED)
    if unknown:
      raise ConfigError(f"unknown QdllmLM arguments {unknown}; see QdllmLM.__init__ for the accepted ones.")
    if model is None:
      if pretrained is None:
        raise ConfigError("QdllmLM needs pretrained=<checkpoint dir> or model=<qdllm_jax Model> + tokenizer.")
      model = load_pretrained(pretrained, dtype=dtype)
      tokenizer = load_tokenizer(pretrained) if tokenizer is None else tokenizer
    if tokenizer is None:
      raise ConfigError("QdllmLM(model=...) needs tokenizer= as well.")
    self.model, self.tok = model, tokenizer
    cfg = model.config
    self.sampler = family_of(cfg).sampler  # "llada" or "dream": the estimator and sampler of the model's family
    if self.sampler not in protocols_lib.SAMPLERS:
      raise ConfigError(f"a {cfg.arch} model does not generate (its family has no masked-diffusion sampler); lm-eval "
                        f"tasks need a family with one of {protocols_lib.SAMPLERS}, e.g. LLaDA or Dream")
    self.mask_id = int(mask_id if mask_id is not None else getattr(model, "mask_id", tokenizer.mask_token_id))
    self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_id
    if self.eos_id is None or self.eos_id == self.mask_id:
      raise ConfigError(f"the tokenizer's EOS id {self.eos_id} is missing or equals the mask id; expected an EOS.")
    self.bos_id = tokenizer.bos_token_id if add_bos_token else None
    if add_bos_token and self.bos_id is None:
      raise ConfigError("add_bos_token=True but the tokenizer has no BOS token; pass add_bos_token=False.")
    self.max_length = int(max_length or cfg.max_seq_len)
    self.mc_num, self.mc_batch, self.cfg_scale = int(mc_num), int(mc_batch), float(cfg_scale)
    self.greedy_check = bool(greedy_check)
    self.gen = dict(gen_length=int(gen_length), steps=int(steps), temperature=float(temperature))
    if self.sampler == "dream":
      if cfg_scale and not ignore_cfg:
        raise ConfigError(f"cfg_scale={cfg_scale}: dream_generate has no classifier-free guidance; pass "
                          "cfg_scale=0, or ignore_cfg=True to run without it (the card records the choice).")
      self.gen.update(top_p=None if top_p is None else float(top_p), alg=alg)
    else:
      self.gen.update(block_length=int(block_length), cfg_scale=float(cfg_scale), remasking=remasking)
    self.batch_size, self.bucket, self.rows_per_call = int(batch_size), int(bucket), int(rows_per_call)
    self.elbo_n_mc, self.elbo_mc_batch = int(elbo_n_mc), int(elbo_mc_batch)
    self.key = jax.random.key(int(seed))
    self._calls = dict.fromkeys(_METHODS, 0)

  # ---------------------------------------------------------------------------------------- helpers
  def _next_key(self, method):
    k = jax.random.fold_in(jax.random.fold_in(self.key, _METHODS[method]), self._calls[method])
    self._calls[method] += 1
    return k

  def _enc(self, text):
    return list(self.tok(text, add_special_tokens=False).input_ids)

  def _prefix(self):
    return [] if self.bos_id is None else [self.bos_id]

  def encode_pair(self, context, continuation):
    """(prompt ids, answer ids) of a loglikelihood request (module docstring), left-truncated to max_length."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = self._enc(context)
    cont = self._enc(context + continuation)[len(ctx):] or self._enc(continuation)
    if not cont:
      raise ConfigError(f"continuation {continuation!r} encodes to no token; expected a non-empty answer.")
    prompt = self._prefix() + ctx
    room = self.max_length - len(cont) - (1 if self.sampler == "dream" else 0)
    if room < 0:
      raise ConfigError(f"continuation of {len(cont)} tokens exceeds max_length={self.max_length}.")
    return prompt[len(prompt) - room:] if len(prompt) > room else prompt, cont

  # ---------------------------------------------------------------------------------------- requests
  def loglikelihood(self, requests, disable_tqdm=False):
    """[(log p(continuation | context), is_greedy)] for requests with args (context, continuation)."""
    if not requests:
      return []
    pairs = [self.encode_pair(*r.args) for r in requests]
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    kw = dict(mask_id=self.mask_id, key=self._next_key("loglikelihood"), mc_num=self.mc_num,
              batch_size=self.mc_batch, bucket=self.bucket, pad_id=self.eos_id,
              pairs_per_call=max(1, self.rows_per_call // self.mc_batch))
    if self.sampler == "dream":
      ll = dream_loglikelihood(self.model, prompts, [a + [self.eos_id] for a in answers], **kw)
    else:
      ll = llada_loglikelihood(self.model, prompts, answers, cfg_scale=self.cfg_scale, **kw)
    out = []
    for r, (p, a), v in zip(requests, pairs, np.atleast_1d(ll)):
      greedy = bool(self.greedy_check and self.sampler == "llada" and
                    llada_greedy_check(self.model, p, a, mask_id=self.mask_id, cfg_scale=self.cfg_scale))
      out.append((float(v), greedy))
      self.cache_hook.add_partial("loglikelihood", r.args, out[-1])
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    """[-B(text)]: the ELBO lower bound on log p(text), summed over lm-eval's disjoint rolling windows."""
    if not requests:
      return []
    prefix = self.bos_id if self.bos_id is not None else self.eos_id
    owner, prompts, answers = [], [], []
    for i, r in enumerate(requests):
      wins = lm_utils.get_rolling_token_windows(token_list=self._enc(r.args[0]), prefix_token=prefix,
                                                max_seq_len=self.max_length - 1, context_len=1)
      for ctx, pred in map(lm_utils.make_disjoint_window, wins):
        owner.append(i), prompts.append(list(ctx)), answers.append(list(pred))
    key = self._next_key("loglikelihood_rolling")
    if self.sampler == "dream":
      ll = dream_loglikelihood(self.model, prompts, [a + [self.eos_id] for a in answers], mask_id=self.mask_id,
                               key=key, mc_num=self.elbo_n_mc, batch_size=self.elbo_mc_batch, bucket=self.bucket,
                               pad_id=self.eos_id, pairs_per_call=max(1, self.rows_per_call // self.elbo_mc_batch))
    else:
      ll = -elbo_nll(self.model, prompts, answers, mask_id=self.mask_id, key=key, n_mc=self.elbo_n_mc,
                     mc_batch=self.elbo_mc_batch, pad_id=self.eos_id, rows_per_call=self.rows_per_call).nll_bound
    out = np.zeros(len(requests))
    np.add.at(out, np.asarray(owner), np.asarray(ll, np.float64))
    for r, v in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood_rolling", r.args, float(v))
    return [float(v) for v in out]

  def generate_until(self, requests, disable_tqdm=False):
    """Generated text per request (context, gen_kwargs), cut at the first EOS and the first `until` string."""
    if not requests:
      return []
    prompts, stops = [], []
    for r in requests:
      ctx, kw = r.args[0], (r.args[1] if len(r.args) > 1 else {}) or {}
      until = kw.get("until", [])
      stops.append([until] if isinstance(until, str) else list(until))
      ids = self._prefix() + self._enc(ctx)
      prompts.append(ids[max(0, len(ids) - (self.max_length - self.gen["gen_length"])):])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [None] * len(prompts)
    for s in range(0, len(order), self.batch_size):
      idx = order[s:s + self.batch_size]
      rows = [prompts[i] for i in idx] + [prompts[idx[0]]] * (self.batch_size - len(idx))
      width = -(-max(len(p) for p in rows) // self.bucket) * self.bucket
      ids = np.full((len(rows), width), self.eos_id, np.int32)
      am = np.zeros((len(rows), width), np.int32)
      for j, p in enumerate(rows):
        ids[j, width - len(p):], am[j, width - len(p):] = p, 1
      key = self._next_key("generate_until")
      if self.sampler == "dream":
        g = self.gen
        x = dream_generate(self.model, ids, mask_id=self.mask_id, max_new_tokens=g["gen_length"], steps=g["steps"],
                           temperature=g["temperature"], top_p=g["top_p"], alg=g["alg"], attention_mask=am, key=key)
      else:
        x = llada_generate(self.model, ids, mask_id=self.mask_id, attention_mask=am, key=key, **self.gen)
      for j, i in enumerate(idx):
        texts[i] = self.decode_generation(np.asarray(x)[j, width:], stops[i])
        self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
    return texts

  def decode_generation(self, gen_ids, until=()):
    """Text of gen_ids up to the first EOS, then cut before the first occurrence of any `until` string."""
    gen = [int(t) for t in gen_ids]
    if self.eos_id in gen:
      gen = gen[:gen.index(self.eos_id)]
    text = self.tok.decode(gen, skip_special_tokens=True)
    for stop in until:
      if stop:
        text = text.split(stop)[0]
    return text


def adapter_kwargs(protocol, task_name) -> dict:
  """QdllmLM keyword arguments that reproduce one task of a protocol (mc settings or sampler settings)."""
  proto = protocols_lib.get_protocol(protocol)
  kw = {"add_bos_token": proto.add_bos_token}
  for t in proto.likelihood:
    if t.name == task_name:
      return dict(kw, mc_num=t.mc_num, mc_batch=t.mc_batch, cfg_scale=t.cfg_scale)
  for t in proto.generation:
    if t.name == task_name:
      kw.update(gen_length=t.gen_length, steps=t.steps, temperature=t.temperature)
      if t.sampler == "dream":
        return dict(kw, top_p=t.top_p, alg=t.alg, cfg_scale=t.cfg_scale)
      return dict(kw, block_length=t.block_length, cfg_scale=t.cfg_scale, remasking=t.remasking)
  raise ConfigError(f"protocol {proto.name!r} has no task {task_name!r}; its tasks are "
                    f"{[t.name for t in proto.likelihood + proto.generation]}.")


def run_protocol(model, tokenizer, protocol, *, tasks=None, task_map=None, include_path=None, limit=None, seed=0,
                 ignore_cfg=False, **lm_kwargs) -> dict:
  """Run every task of a real-benchmark protocol through lm_eval.simple_evaluate, one adapter per task.

  tasks: subset of the protocol's task names. task_map: {protocol task name: the lm-eval task to run instead}
  (e.g. a local-data copy from include_path). limit: examples per task (testing only). Returns
  {"protocol": card, "results": {task: lm-eval metrics dict}, "n_shot": {task: shots}, "ignore_cfg": bool}.
  """
  from lm_eval import simple_evaluate  # lm_eval.evaluator and its task registry: heavy, only when tasks run
  from lm_eval.tasks import TaskManager
  proto = protocols_lib.get_protocol(protocol)
  specs = {t.name: t for t in proto.likelihood + proto.generation}
  names = list(specs) if tasks is None else list(tasks)
  for n in names:
    adapter_kwargs(proto, n)  # validates the name before any work
  manager = TaskManager(include_path=include_path)
  out = {"protocol": proto.card(), "results": {}, "n_shot": {}, "ignore_cfg": bool(ignore_cfg)}
  for n in names:
    lm = QdllmLM(model=model, tokenizer=tokenizer, seed=seed, ignore_cfg=ignore_cfg,
                 **dict(adapter_kwargs(proto, n), **lm_kwargs))
    task = (task_map or {}).get(n, n)
    res = simple_evaluate(model=lm, tasks=[task], num_fewshot=specs[n].num_fewshot, limit=limit,
                          task_manager=manager, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed, confirm_run_unsafe_code=specs[n].metric == "pass@1",
                          log_samples=False)
    out["results"][n] = res["results"]
    out["n_shot"][n] = specs[n].num_fewshot
  return out
