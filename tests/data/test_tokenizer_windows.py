"""Tokenizer files and special ids; corpus windows and task-row layout."""
import json
import os

import numpy as np
import pytest

from qdllm_jax.data import sequences, tasks, tokenizer
from qdllm_jax.errors import ConfigError

TEXTS = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light."] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tok"))
  rng = np.random.default_rng(0)
  task_text = ["".join(tasks.training_text(tasks.sample_example(rng, f))) for f in tasks.FAMILIES for _ in range(40)]
  tokenizer.train_tokenizer(TEXTS + task_text, d, vocab_size=320)
  return tokenizer.load_tokenizer(d), d


def test_tokenizer_files_and_specials(tok):
  t, d = tok
  for f in tokenizer.TOKENIZER_FILES:
    assert os.path.isfile(os.path.join(d, f)), f
  with open(os.path.join(d, "special_tokens_map.json")) as f:
    assert json.load(f)["mask_token"] == "<|mdm_mask|>"
  with open(os.path.join(d, "tokenizer_config.json")) as f:
    assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert tokenizer.special_ids(t) == {"eos": 0, "bos": 1, "mask": 2, "pad": 0}
  assert t.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|bos|>", "<|mdm_mask|>"]
  ids = t(TEXTS[0], add_special_tokens=False).input_ids
  assert t.decode(ids) == TEXTS[0] and not {0, 1, 2} & set(ids)
  ov = tokenizer.config_overrides(t)
  assert ov["vocab_size"] == ov["embedding_size"] == len(t) <= 320
  assert (ov["mask_token_id"], ov["eos_token_id"], ov["pad_token_id"], ov["bos_token_id"]) == (2, 0, 0, 1)


def test_tokenizer_errors(tmp_path):
  with pytest.raises(ConfigError, match="vocab_size"):
    tokenizer.train_tokenizer(TEXTS, str(tmp_path), vocab_size=100)
  with pytest.raises(ConfigError, match="tokenizer.json"):
    tokenizer.load_tokenizer(str(tmp_path / "empty"))


def test_stream_and_windows(tok):
  t, _ = tok
  stream = sequences.encode_stream(t, TEXTS[:2])
  a = t(TEXTS[0], add_special_tokens=False).input_ids
  b = t(TEXTS[1], add_special_tokens=False).input_ids
  assert stream.tolist() == [1] + a + [0] + [1] + b + [0]
  rng = np.random.default_rng(0)
  w = sequences.corpus_batch(stream, rng, 5, 7)
  assert w.shape == (5, 7) and w.dtype == np.int32
  joined = ",".join(map(str, stream.tolist()))
  for row in w:  # every window is a contiguous slice of the stream
    assert ",".join(map(str, row.tolist())) in joined
  with pytest.raises(ConfigError, match="shorter"):
    sequences.corpus_batch(stream, rng, 1, len(stream))


def test_task_rows_layout(tok):
  t, _ = tok
  rng = np.random.default_rng(1)
  b = sequences.task_batch(t, rng, 40, 24)
  for r in range(40):
    n = int(b["key_mask"][r].sum())
    assert b["key_mask"][r, :n].all() and not b["key_mask"][r, n:].any()
    assert b["ids"][r, 0] == 1 and np.all(b["ids"][r, n:] == 0)
    ans = np.flatnonzero(b["loss_mask"][r])
    assert ans[-1] == n - 1 and np.all(np.diff(ans) == 1)  # a suffix of the real tokens
    region = b["ids"][r, ans[0]:n]
    text = sequences.decode_answer(t, region)
    if len(ans) == sequences.GEN_LEN and 0 in region.tolist():  # generation rows: answer, then EOS fill only
      assert np.all(region[region.tolist().index(0):] == 0)
    assert text and not text.startswith("=>")
  gen = tasks.load_eval_set("gen")[0]
  ids, plen = sequences.task_row(t, gen)
  assert ids[:plen] == sequences.gen_prompt_ids(t, gen) and len(ids) == plen + sequences.GEN_LEN
  assert sequences.decode_answer(t, ids[plen:]) == gen.answer.strip()
  with pytest.raises(ConfigError, match="width"):
    sequences.task_batch(t, rng, 4, 5)
