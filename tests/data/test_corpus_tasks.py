"""Shipped corpus and synthetic tasks: split rule, answers vs independent solvers, train/eval disjointness."""
import hashlib
import os

import numpy as np
import pytest

from qdllm_jax.data import corpus, tasks
from qdllm_jax.errors import ConfigError


def test_corpus_size_and_split():
  size = os.path.getsize(corpus.CORPUS_PATH)
  assert 1_000_000 < size <= 3_000_000
  assert os.path.exists(os.path.join(os.path.dirname(corpus.CORPUS_PATH), "SOURCE.md"))
  docs = corpus.read_documents()
  splits = corpus.load_splits()
  assert len(splits["train"]) + len(splits["heldout"]) == len(docs)
  for d in docs[:50]:
    title = d.split("\n", 1)[0]
    h = int(hashlib.sha256(("kjv:" + title).encode()).hexdigest(), 16) % 20 == 0
    assert (d in splits["heldout"]) == h
    assert title.rsplit(" ", 1)[0] in corpus.BOOKS and title.rsplit(" ", 1)[1].isdigit()
  assert 0.02 < len(splits["heldout"]) / len(docs) < 0.1
  assert docs[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")


def test_corpus_missing_file_raises(tmp_path):
  with pytest.raises(ConfigError, match="not found"):
    corpus.read_documents(str(tmp_path / "nope.txt"))


def _solve(ex):
  """Independent solvers parsing the prompt text."""
  if ex.family in ("shift", "increment"):
    xs = ex.prompt.split(":")[1].replace("=>", "").split()
    if ex.family == "shift":
      return " ".join("abcdefghijklmnopqrstuvwxyz"["abcdefghijklmnopqrstuvwxyz".index(x) + 1] for x in xs)
    return " ".join(str((int(x) + 1) % 10) for x in xs)
  if ex.family == "reverse":
    xs = ex.prompt.split(":")[1].replace("=>", "").split()
    return " ".join(reversed(xs))
  if ex.family == "sort":
    xs = ex.prompt.split(":")[1].replace("=>", "").split()
    return " ".join(sorted(xs, key=int))
  if ex.family == "max":
    xs = ex.prompt.split(":")[1].replace("=>", "").split()
    return str(max(int(x) for x in xs))
  if ex.family == "analogy":
    b = ex.prompt.split(",")[1].split("->")[0].strip()
    return chr(ord(b) + 1)
  if ex.family == "odd":
    xs = ex.prompt.split(":")[1].replace("=>", "").split()
    digits = [x for x in xs if x.isdigit()]
    return digits[0] if len(digits) == 1 else [x for x in xs if not x.isdigit()][0]
  raise AssertionError(ex.family)


@pytest.mark.parametrize("family", tasks.ALL_FAMILIES)
def test_answers_match_independent_solver(family):
  rng = np.random.default_rng(5)
  for split in ("train", "eval"):
    for _ in range(300):
      ex = tasks.sample_example(rng, family, split)
      assert ex.answer.strip() == _solve(ex)
      assert tasks.is_eval_instance(family, ex.key) == (split == "eval")
      if isinstance(ex, tasks.MCExample):
        assert len(ex.choices) == 4 and len(set(ex.choices)) == 4


def test_eval_sets_are_fixed_and_disjoint_from_training():
  gen, mc = tasks.load_eval_set("gen"), tasks.load_eval_set("mc")
  for fam in tasks.GEN_FAMILIES:
    assert [e for e in gen if e.family == fam] == tasks.make_eval_set(fam, 200)
  for fam in tasks.MC_FAMILIES:
    assert [e for e in mc if e.family == fam] == tasks.make_eval_set(fam, 200)
  assert {e.family for e in gen} == set(tasks.GEN_FAMILIES) and {e.family for e in mc} == set(tasks.MC_FAMILIES)
  eval_keys = {(e.family, e.key) for e in gen + mc}
  assert len(eval_keys) == len(gen) + len(mc)  # no duplicates
  rng = np.random.default_rng(0)
  train_keys = {(f, tasks.sample_example(rng, f).key) for _ in range(400) for f in tasks.FAMILIES}
  assert not train_keys & eval_keys
  for e in gen + mc:  # the hash rule, recomputed
    assert int(hashlib.sha256(f"{e.family}:{e.key}".encode()).hexdigest(), 16) % 5 == 0


def test_generators_are_deterministic():
  a = [tasks.sample_example(np.random.default_rng(3), f) for f in tasks.FAMILIES]
  b = [tasks.sample_example(np.random.default_rng(3), f) for f in tasks.FAMILIES]
  assert a == b


def test_bad_family_or_split_raises():
  with pytest.raises(ConfigError, match="family"):
    tasks.sample_example(np.random.default_rng(0), "nope")
  with pytest.raises(ConfigError, match="split"):
    tasks.sample_example(np.random.default_rng(0), "sort", "test")
  with pytest.raises(ConfigError, match="kind"):
    tasks.load_eval_set("x")
