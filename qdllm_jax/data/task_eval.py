"""Self-contained scoring of the synthetic tasks (used while training and in the model card).

Generation: LLaDA low-confidence remasking at temperature 0 with one block (LLaDA, arXiv 2502.09992,
its low-confidence remasking sampler; ML-GSAI/LLaDA generate.py) and
steps = gen_length = GEN_LEN, i.e. every step commits the single most confident masked position
(argmax token, confidence softmax(l)[argmax]), run by the package's sampler; exact match of `decode_answer`
with the stripped answer.
Multiple choice: every choice of the shipped families is one token, so the LLaDA conditional
log-likelihood is exact with one forward: log p(c | prompt) = log_softmax(logits([BOS] prompt MASK))[-1, c]
(with one answer token the estimator always masks l = 1 of L = 1 tokens). The official samplers and
estimator (`qdllm_jax.eval.likelihood`) computes the same numbers (tested); this closed form needs one forward
per example instead of one per choice.
"""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.data import sequences
from qdllm_jax.errors import ConfigError
from qdllm_jax.models import transformer
from qdllm_jax.models.model import Model
from qdllm_jax.models.model_config import ModelConfig
from qdllm_jax.sampling.llada_sampler import llada_generate


def greedy_generate(params, cfg: ModelConfig, prompts: np.ndarray, gen_len: int) -> np.ndarray:
  """Low-confidence remasking at temperature 0 in one block of gen_len steps (one position committed per step):
  int32 prompts [B, P] -> generated int32 [B, gen_len]. The package's sampler (`sampling.llada_generate`)."""
  p = prompts.shape[1]
  out = llada_generate(Model(params=params, config=cfg), np.asarray(prompts, np.int32), mask_id=cfg.mask_id,
                       steps=gen_len, gen_length=gen_len, block_length=gen_len)
  return np.asarray(out)[:, p:]


def eval_generation(params, cfg: ModelConfig, tok, examples, batch: int = 128) -> dict:
  """Exact-match accuracy per family and overall: {'shift': acc, ..., 'all': acc} (floats in [0, 1])."""
  by_len = collections.defaultdict(list)
  for ex in examples:
    by_len[len(sequences.gen_prompt_ids(tok, ex))].append(ex)
  hits = collections.defaultdict(list)
  for _, exs in sorted(by_len.items()):
    for i in range(0, len(exs), batch):
      chunk = exs[i:i + batch]
      prompts = np.asarray([sequences.gen_prompt_ids(tok, ex) for ex in chunk], np.int32)
      gen = greedy_generate(params, cfg, prompts, sequences.GEN_LEN)
      for ex, g in zip(chunk, gen):
        hits[ex.family].append(sequences.decode_answer(tok, g) == ex.answer.strip())
  out = {f: float(np.mean(h)) for f, h in sorted(hits.items())}
  out["all"] = float(np.mean([h for v in hits.values() for h in v]))
  return out


def mc_choice_scores(params, cfg: ModelConfig, tok, examples, batch: int = 256) -> list[np.ndarray]:
  """Exact log p(choice | [BOS] prompt) for single-token choices: one float array [K] per example."""
  by_len = collections.defaultdict(list)
  for j, ex in enumerate(examples):
    ctx, _ = sequences.mc_ids(tok, ex.prompt, ex.choices[0])
    cids = [sequences.mc_ids(tok, ex.prompt, c)[1] for c in ex.choices]
    if any(len(c) != 1 for c in cids):
      raise ConfigError(f"{ex.family} example {ex.key!r} has a multi-token choice; this scorer needs one token "
                        "per choice: use qdllm_jax.eval's Monte-Carlo estimator")
    by_len[len(ctx)].append((j, ctx, [c[0] for c in cids]))
  scores = [None] * len(examples)
  for _, items in sorted(by_len.items()):
    for i in range(0, len(items), batch):
      chunk = items[i:i + batch]
      x = np.asarray([ctx + [cfg.mask_id] for _, ctx, _ in chunk], np.int32)
      logp = jax.nn.log_softmax(transformer.forward_jit(params, cfg, jnp.asarray(x))[:, -1], -1)
      logp = np.asarray(logp)
      for r, (j, _, cs) in enumerate(chunk):
        scores[j] = logp[r, cs]
  return scores


def eval_multiple_choice(params, cfg: ModelConfig, tok, examples) -> dict:
  """Accuracy (argmax of log p(choice | prompt) == label) per family and overall."""
  hits = collections.defaultdict(list)
  for ex, s in zip(examples, mc_choice_scores(params, cfg, tok, examples)):
    hits[ex.family].append(int(np.argmax(s)) == ex.label)
  out = {f: float(np.mean(h)) for f, h in sorted(hits.items())}
  out["all"] = float(np.mean([h for v in hits.values() for h in v]))
  return out
