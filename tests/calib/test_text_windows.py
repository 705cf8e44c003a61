"""Calibration windows: GPTQ-style random windows from documents / a stream / raw texts."""
import json

import numpy as np
import pytest

from qdllm_jax.calib import text_windows
from qdllm_jax.errors import ConfigError


def _is_slice_of(w, doc):
  n = len(w)
  return any(np.array_equal(doc[s:s + n], w) for s in range(len(doc) - n + 1))


def test_windows_from_docs():
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 1000, size=L).astype(np.int32) for L in (5, 40, 7, 33, 60, 12, 25)]
  out = text_windows.make_windows(docs, 4, 20, 0)
  assert out.shape == (4, 20) and out.dtype == np.int32
  long_docs = [d for d in docs if len(d) >= 20]
  owners = [[k for k, d in enumerate(long_docs) if _is_slice_of(w, d)] for w in out]
  assert all(owners)                                     # every window is a contiguous slice of a long doc
  assert len({o[0] for o in owners}) == 4                # distinct documents while enough are long
  np.testing.assert_array_equal(out, text_windows.make_windows(docs, 4, 20, 0))
  assert not np.array_equal(out, text_windows.make_windows(docs, 4, 20, 1))
  many = text_windows.make_windows(docs, 9, 20, 0)            # more windows than long docs: with replacement
  assert all(any(_is_slice_of(w, d) for d in long_docs) for w in many)


def test_windows_from_stream_cover_all_starts():
  stream = np.arange(30, dtype=np.int32)
  out = text_windows.make_windows(stream, 400, 10, 0)
  starts = out[:, 0]
  np.testing.assert_array_equal(out, starts[:, None] + np.arange(10))
  assert set(starts.tolist()) == set(range(21))          # every start 0..len-seqlen reachable


def test_docs_to_stream_and_too_short():
  s = text_windows.docs_to_stream([np.array([1, 2]), np.array([3])], sep_id=9)
  np.testing.assert_array_equal(s, [1, 2, 9, 3])
  with pytest.raises(ConfigError, match="longest: 3"):
    text_windows.make_windows([np.arange(3), np.arange(2)], 2, 5, 0)
  with pytest.raises(ConfigError, match="fewer than seqlen"):
    text_windows.make_windows(np.arange(3), 2, 5, 0)


class _CharTok:
  def encode(self, text, add_special_tokens=False):
    return [ord(c) for c in text]


def test_windows_from_texts_and_files(tmp_path):
  texts = ["short", "a" * 3 + "the quick brown fox jumps", "tiny", "lorem ipsum dolor sit amet consectetur"]
  out = text_windows.windows_from_texts(texts, _CharTok(), 6, 12, 0)
  assert out.shape == (6, 12)
  for w in out:
    assert any("".join(map(chr, w)) in t for t in texts if len(t) >= 12)
  np.testing.assert_array_equal(out, text_windows.windows_from_texts(texts, _CharTok(), 6, 12, 0))
  with pytest.raises(ConfigError, match="too short"):
    text_windows.windows_from_texts(["ab", "cd"], _CharTok(), 2, 12, 0, max_draws=20)
  jl = tmp_path / "c.jsonl"
  jl.write_text("\n".join(json.dumps({"text": t}) for t in texts[:2]) + "\n")
  txt = tmp_path / "d.txt"
  txt.write_text("plain document")
  assert text_windows.read_text_files([str(jl), str(txt)]) == texts[:2] + ["plain document"]
  docs = text_windows.tokenize_documents(["ab"], _CharTok())
  np.testing.assert_array_equal(docs[0], [97, 98])
  with pytest.raises(ConfigError, match="does not exist"):
    text_windows.read_text_files([str(tmp_path / "missing.txt")])


def test_load_dataset_texts_local_file(tmp_path):
  pytest.importorskip("datasets")
  jl = tmp_path / "c4.jsonl"
  jl.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)) + "\n")
  texts = text_windows.load_dataset_texts(str(jl), limit=3, cache_dir=str(tmp_path / "cache"))
  assert texts == ["doc 0", "doc 1", "doc 2"]
  with pytest.raises(ConfigError, match="columns"):
    text_windows.load_dataset_texts(str(jl), field="content", cache_dir=str(tmp_path / "cache"))
