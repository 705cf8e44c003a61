"""Fixtures for the evaluation tests: a small byte-level BPE trained on the fly (the shipped format: EOS 0 = pad,
BOS 1, <|mdm_mask|> 2), a random LLaDA over it, a context-free toy model, and the shipped model if built."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.data import corpus, tasks, tokenizer
from qdllm_jax.data.shipped import TINY_MODEL_DIR
from qdllm_jax.models import Model, transformer
from qdllm_jax.models.llada import LLADA_TINY_TEST, llada_config

SHIPPED = TINY_MODEL_DIR
HAS_SHIPPED = os.path.isfile(os.path.join(SHIPPED, "model.safetensors"))


@pytest.fixture(scope="session")
def small_tok(tmp_path_factory):
  """A 400-id BPE trained on the eval-set strings and 10 corpus chapters (deterministic, < 1 s)."""
  texts = [e.prompt + e.answer for kind in ("gen", "mc") for e in tasks.load_eval_set(kind)]
  texts += corpus.load_splits()["train"][:10]
  texts += [" ".join(tasks.LETTERS + tasks.DIGITS)] * 50  # every " x" choice becomes one token, as in the shipped BPE
  out = str(tmp_path_factory.mktemp("tok"))
  tokenizer.train_tokenizer(texts, out, vocab_size=400)
  return tokenizer.load_tokenizer(out)


def random_llada(vocab, seed=0, std=0.3, n_layers=2):
  """A random LLaDA (d_model 32) with the shipped special ids; std 0.3 gives clearly separated logits."""
  cfg = llada_config(LLADA_TINY_TEST, vocab_size=vocab, embedding_size=vocab, mask_token_id=2, eos_token_id=0,
                     pad_token_id=0, bos_token_id=1, n_layers=n_layers, max_sequence_length=512)
  return Model(transformer.init_params(cfg, jax.random.key(seed), std=std), cfg)


@pytest.fixture(scope="session")
def small_model(small_tok):
  return random_llada(len(small_tok))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ContextFree:
  """logits[b, i] = table[ids[b, i]] + pos_bias[i]: position i's prediction ignores every other token, so the
  masked CE of a token does not depend on which other tokens are masked. mask_id = 2."""
  table: jax.Array
  pos_bias: jax.Array
  mask_id = 2

  def __call__(self, input_ids, attention_mask=None):
    return self.table[input_ids] + self.pos_bias[:input_ids.shape[1]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Mixer:
  """logits_i = (E[x_i] + P[i] + mean_{j real} tanh((E[x_j] + P[j]) W)) U: every prediction depends on the
  whole (unpadded) context; padded keys (mask 0) are ignored and positions are 0..T-1, so right padding is exact."""
  emb: jax.Array
  pos: jax.Array
  mix: jax.Array
  out: jax.Array
  mask_id = 2

  def __call__(self, input_ids, attention_mask=None):
    am = jnp.ones(input_ids.shape, jnp.float32) if attention_mask is None else attention_mask.astype(jnp.float32)
    h = self.emb[input_ids] + self.pos[:input_ids.shape[1]]
    ctx = jnp.sum(jnp.tanh(h @ self.mix) * am[..., None], 1) / jnp.sum(am, 1)[:, None]
    return (h + ctx[:, None]) @ self.out


def make_mixer(vocab=7, dim=6, seed=0):
  r = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
  return Mixer(f(vocab, dim), f(32, dim), f(dim, dim) * 2.0, f(dim, vocab))


def make_context_free(vocab=7, length=32, seed=0):
  r = np.random.default_rng(seed)
  return ContextFree(jnp.asarray(r.normal(size=(vocab, vocab)) * 2, jnp.float32),
                     jnp.asarray(r.normal(size=(length, vocab)), jnp.float32))


@pytest.fixture(scope="session")
def shipped():
  if not HAS_SHIPPED:
    pytest.skip("qdllm_jax/shipped/tiny-llada/model.safetensors not built yet")
  from qdllm_jax.models import load_pretrained
  return load_pretrained(SHIPPED), tokenizer.load_tokenizer(SHIPPED)
