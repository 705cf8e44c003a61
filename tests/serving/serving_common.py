"""Independent references of the serving tests: the samplers called directly on `load_quantized`, decoded by the
tokenizer, cut at the first EOS / end-of-turn id (the tokenizer's own, looked up here)."""
import os

import jax
import numpy as np

from qdllm_jax.checkpoint import load_quantized
from qdllm_jax.data.shipped import TINY_MODEL_DIR
from qdllm_jax.models import transformer
from qdllm_jax.sampling import llada_generate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = TINY_MODEL_DIR
SAMPLER = dict(gen_length=8, steps=8, block_length=4)
FLAGS = [f"--sampler.{k}={v}" for k, v in SAMPLER.items()]


def direct(q_dir, rows, *, seed=0, batch=0, temperature=0.0):
  """int32 [B, gen] from llada_generate on load_quantized(q_dir), key fold_in(key(seed), batch)."""
  model = load_quantized(q_dir)
  out = llada_generate(model, np.asarray(rows, np.int32), mask_id=model.config.mask_id, temperature=temperature,
                       key=jax.random.fold_in(jax.random.key(seed), batch), **SAMPLER)
  return np.asarray(out)[:, len(rows[0]):]


def text_of(tok, gen):
  stops = {tok.eos_token_id, tok.get_vocab().get("<|eot_id|>")} - {None}
  ids = []
  for t in gen.tolist():
    if t in stops:
      break
    ids.append(t)
  return tok.decode(ids, skip_special_tokens=True)


def same_length_prompts(tok, k, words=("light", "water", "earth", "heaven", "night", "day", "land", "sea", "fire",
                                       "man", "king", "voice", "house", "bread")):
  """k distinct prompts 'And God made the <word>' of one token length (batched rows need no padding)."""
  by_len = {}
  for w in words:
    p = f"And God made the {w}"
    by_len.setdefault(len(tok(p)["input_ids"]), []).append(p)
  best = max(by_len.values(), key=len)
  assert len(best) >= k, by_len
  return best[:k]


def random_params(cfg, rng, std=0.3):
  """N(0, std^2) matrices and unit norms in float32, built in numpy (no compilation)."""
  def leaf(name, shape):
    return np.ones(shape, np.float32) if "norm" in name else (rng.standard_normal(shape) * std).astype(np.float32)
  shapes = transformer.param_shapes(cfg)
  out = {k: leaf(k, v) for k, v in shapes.items() if k != "blocks"}
  out["blocks"] = [{k: leaf(k, v) for k, v in b.items()} for b in shapes["blocks"]]
  return out
