"""Token-level batches: corpus windows (pretraining form) and task rows (SFT form), plus eval encodings.

Corpus: every document is encoded as [BOS] tokens [EOS] and the documents are concatenated into one stream;
a batch is B windows of L tokens at uniformly random offsets (LLaDA pretraining packs documents the same way).

Task rows (one example per row, right-padded with EOS to a fixed width T, padding keys masked out):
  generation       [BOS] prompt answer EOS ... EOS     answer region = GEN_LEN tokens (answer + EOS fill)
  multiple choice  [BOS] prompt choice                 answer region = the choice tokens
`loss_mask` marks the answer region (the only positions the SFT objective may mask), `key_mask` the real
tokens. LLaDA positions are 0..T-1 and masked keys are invisible, so a padded row computes exactly what
the unpadded sequence would: the eval canvases ([BOS] prompt + GEN_LEN masks; [BOS] prompt choice) match
the training rows with no padding at all.
"""
from __future__ import annotations

import numpy as np

from qdllm_jax.data import tasks as tasks_lib
from qdllm_jax.data.tokenizer import special_ids
from qdllm_jax.errors import ConfigError

GEN_LEN = 8  # generation answer region: longest answer (5 items) + EOS fill; the sampler's gen_length


def encode_stream(tok, docs: list[str]) -> np.ndarray:
  """int32 [N]: concat over docs of [BOS] encode(doc) [EOS]."""
  ids = special_ids(tok)
  out = []
  for ids_doc in tok(docs, add_special_tokens=False).input_ids:
    out.extend([ids["bos"], *ids_doc, ids["eos"]])
  return np.asarray(out, np.int32)


def corpus_batch(stream: np.ndarray, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
  """int32 [batch, length] windows stream[o : o + length] at offsets o ~ U{0 .. N - length}."""
  if stream.shape[0] <= length:
    raise ConfigError(f"token stream of {stream.shape[0]} tokens is shorter than the window {length}")
  offs = rng.integers(0, stream.shape[0] - length, size=batch)
  return np.stack([stream[o:o + length] for o in offs])


def gen_prompt_ids(tok, ex) -> list[int]:
  """[BOS] + prompt tokens: the prompt a sampler completes with GEN_LEN masked positions."""
  return [special_ids(tok)["bos"]] + tok(ex.prompt, add_special_tokens=False).input_ids


def answer_region(tok, ex) -> list[int]:
  """Generation target: answer tokens + EOS fill up to GEN_LEN."""
  ans = tok(ex.answer, add_special_tokens=False).input_ids
  if len(ans) > GEN_LEN:
    raise ConfigError(f"answer {ex.answer!r} has {len(ans)} tokens; GEN_LEN is {GEN_LEN}")
  return ans + [special_ids(tok)["eos"]] * (GEN_LEN - len(ans))


def mc_ids(tok, prompt: str, choice: str) -> tuple[list[int], list[int]]:
  """([BOS] + prompt tokens, choice tokens): the context / continuation pair of a likelihood query."""
  return [special_ids(tok)["bos"]] + tok(prompt, add_special_tokens=False).input_ids, \
      tok(choice, add_special_tokens=False).input_ids


def decode_answer(tok, gen_ids) -> str:
  """Text of generated ids up to the first EOS, stripped; compare with ex.answer.strip()."""
  eos = special_ids(tok)["eos"]
  gen = list(np.asarray(gen_ids).tolist())
  if eos in gen:
    gen = gen[:gen.index(eos)]
  return tok.decode(gen).strip()


def task_row(tok, ex) -> tuple[list[int], int]:
  """(ids, prompt_len) of the training form of one example (correct choice only for MC)."""
  if isinstance(ex, tasks_lib.GenExample):
    p = gen_prompt_ids(tok, ex)
    return p + answer_region(tok, ex), len(p)
  p, c = mc_ids(tok, ex.prompt, ex.answer)
  return p + c, len(p)


def task_batch(tok, rng: np.random.Generator, batch: int, width: int, families=tasks_lib.FAMILIES) -> dict:
  """A batch of training-pool task rows, families drawn uniformly.

  Returns numpy dict: ids int32 [B, width] (EOS-padded), key_mask bool [B, width] (real tokens),
  loss_mask bool [B, width] (answer region).
  """
  eos = special_ids(tok)["eos"]
  ids = np.full((batch, width), eos, np.int32)
  key = np.zeros((batch, width), bool)
  loss = np.zeros((batch, width), bool)
  fams = rng.integers(0, len(families), size=batch)
  for r, f in enumerate(fams):
    row, plen = task_row(tok, tasks_lib.sample_example(rng, families[int(f)], "train"))
    if len(row) > width:
      raise ConfigError(f"task row of {len(row)} tokens does not fit the width {width}; raise task_width")
    ids[r, :len(row)] = row
    key[r, :len(row)] = True
    loss[r, plen:len(row)] = True
  return {"ids": ids, "key_mask": key, "loss_mask": loss}
