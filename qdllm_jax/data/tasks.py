"""Synthetic task families the tiny LLaDA learns, mirroring the papers' two kinds of evaluation.

Generation (scored by exact match of the sampler's decoded answer, like BBH / GSM8K):
  shift     "shift: q c x b =>"        -> " r d y c"     4 letters from a..y, each replaced by its successor
  increment "increment: 7 2 9 4 =>"    -> " 8 3 0 5"     4 digits, each + 1 mod 10
  (harder, not learnt by the shipped model within its CPU budget, kept for larger models:)
  reverse   "reverse: q c x =>"        -> " x c q"       3-5 lowercase letters
  sort      "sort: 7 2 9 4 =>"         -> " 2 4 7 9"     3-5 distinct digits
Multiple choice (scored by the conditional log-likelihood of each choice, like ARC / HellaSwag):
  max       "largest: 3 8 1 5 =>"      choices " 3" " 8" " 1" " 5", label 1
  analogy   "b -> c , p ->"            choices 4 letters, the successor of the second letter is right
  odd       "odd one out: c 7 k q =>"  choices the 4 items, the one digit among letters (or letter among digits)

Every instance has a canonical key; it belongs to the evaluation pool iff sha256(family + ":" + key) mod 5 == 0,
and training never draws such an instance, so train and eval instances are disjoint. Generators are pure
functions of a `numpy.random.Generator`. Training mixes only the correct form of a multiple-choice example
(prompt + right choice). The fixed eval sets live in `qdllm_jax/data/eval_sets/{gen,mc}.jsonl`
(`export_eval_sets` writes them, `load_eval_set` reads them).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import string

import numpy as np

from qdllm_jax.errors import ConfigError

GEN_FAMILIES = ("shift", "increment")
EXTRA_GEN_FAMILIES = ("reverse", "sort")
MC_FAMILIES = ("max", "analogy", "odd")
FAMILIES = GEN_FAMILIES + MC_FAMILIES
ALL_FAMILIES = FAMILIES + EXTRA_GEN_FAMILIES
EVAL_MOD = 5
EVAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_sets")
LETTERS = string.ascii_lowercase
DIGITS = string.digits


@dataclasses.dataclass(frozen=True)
class GenExample:
  """A generation instance: the sampler completes `prompt`; correct iff the decoded answer == `answer`."""
  family: str
  prompt: str
  answer: str
  key: str


@dataclasses.dataclass(frozen=True)
class MCExample:
  """A multiple-choice instance: the choice with the highest log p(choice | prompt) should be `label`."""
  family: str
  prompt: str
  choices: tuple
  label: int
  key: str

  @property
  def answer(self) -> str:
    return self.choices[self.label]


def is_eval_instance(family: str, key: str) -> bool:
  """True iff sha256(family:key) mod 5 == 0 (the instance is reserved for evaluation)."""
  return int(hashlib.sha256(f"{family}:{key}".encode()).hexdigest(), 16) % EVAL_MOD == 0


def _items(rng: np.random.Generator, alphabet: str, n: int, distinct: bool) -> list[str]:
  idx = rng.choice(len(alphabet), size=n, replace=not distinct)
  return [alphabet[i] for i in idx]


def _reverse(rng):
  xs = _items(rng, LETTERS, int(rng.integers(3, 6)), distinct=False)
  key = "".join(xs)
  return GenExample("reverse", "reverse: " + " ".join(xs) + " =>", " " + " ".join(xs[::-1]), key)


def _sort(rng):
  xs = _items(rng, DIGITS, int(rng.integers(3, 6)), distinct=True)
  key = "".join(xs)
  return GenExample("sort", "sort: " + " ".join(xs) + " =>", " " + " ".join(sorted(xs)), key)


def _shift(rng):
  xs = _items(rng, LETTERS[:-1], 4, distinct=False)
  return GenExample("shift", "shift: " + " ".join(xs) + " =>",
                    " " + " ".join(LETTERS[LETTERS.index(x) + 1] for x in xs), "".join(xs))


def _increment(rng):
  xs = _items(rng, DIGITS, 4, distinct=False)
  return GenExample("increment", "increment: " + " ".join(xs) + " =>",
                    " " + " ".join(str((int(x) + 1) % 10) for x in xs), "".join(xs))


def _max(rng):
  xs = _items(rng, DIGITS, 4, distinct=True)
  key = "".join(xs)
  return MCExample("max", "largest: " + " ".join(xs) + " =>", tuple(" " + x for x in xs),
                   int(np.argmax([int(x) for x in xs])), key)


def _analogy(rng):
  a, b = (LETTERS[int(i)] for i in rng.integers(0, 25, size=2))
  right = LETTERS[LETTERS.index(b) + 1]
  others = [c for c in LETTERS if c != right]
  wrong = [others[int(i)] for i in rng.choice(len(others), size=3, replace=False)]
  label = int(rng.integers(0, 4))
  choices = wrong[:label] + [right] + wrong[label:]
  nxt = LETTERS[LETTERS.index(a) + 1]
  return MCExample("analogy", f"{a} -> {nxt} , {b} ->", tuple(" " + c for c in choices), label, a + b)


def _odd(rng):
  major, minor = (LETTERS, DIGITS) if rng.integers(0, 2) == 0 else (DIGITS, LETTERS)
  xs = _items(rng, major, 3, distinct=True)
  label = int(rng.integers(0, 4))
  xs.insert(label, _items(rng, minor, 1, distinct=True)[0])
  return MCExample("odd", "odd one out: " + " ".join(xs) + " =>", tuple(" " + x for x in xs), label, "".join(xs))


_GENERATORS = {"shift": _shift, "increment": _increment, "max": _max, "analogy": _analogy, "odd": _odd,
               "reverse": _reverse, "sort": _sort}


def sample_example(rng: np.random.Generator, family: str, split: str = "train"):
  """Draw one instance of `family` from the train pool (split='train') or the eval pool (split='eval')."""
  if family not in _GENERATORS:
    raise ConfigError(f"unknown task family {family!r}; expected one of {ALL_FAMILIES}")
  if split not in ("train", "eval"):
    raise ConfigError(f"unknown split {split!r}; expected 'train' or 'eval'")
  want_eval = split == "eval"
  while True:
    ex = _GENERATORS[family](rng)
    if is_eval_instance(family, ex.key) == want_eval:
      return ex


def training_text(ex) -> tuple[str, str]:
  """(prompt, answer) of the form mixed into training: the correct completion only."""
  return ex.prompt, ex.answer


def make_eval_set(family: str, n: int, seed: int = 1234) -> list:
  """n distinct eval-pool instances of `family` (fewer if the pool is smaller), deterministic in seed."""
  rng = np.random.default_rng([seed, ALL_FAMILIES.index(family)])
  out, seen = [], set()
  for _ in range(50 * n):
    ex = sample_example(rng, family, "eval")
    if ex.key not in seen:
      seen.add(ex.key)
      out.append(ex)
      if len(out) == n:
        break
  return out


def _to_json(ex) -> dict:
  d = dataclasses.asdict(ex)
  if isinstance(ex, MCExample):
    d["choices"] = list(ex.choices)
  return d


def export_eval_sets(out_dir: str = EVAL_DIR, n: int = 200, seed: int = 1234) -> dict[str, str]:
  """Write gen.jsonl (GEN_FAMILIES) and mc.jsonl (MC_FAMILIES), n instances per family; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for kind, fams in (("gen", GEN_FAMILIES), ("mc", MC_FAMILIES)):
    paths[kind] = os.path.join(out_dir, f"{kind}.jsonl")
    with open(paths[kind], "w") as f:
      for fam in fams:
        for ex in make_eval_set(fam, n, seed):
          f.write(json.dumps(_to_json(ex)) + "\n")
  return paths


def load_eval_set(kind: str, path: str | None = None, families=None) -> list:
  """Read the fixed eval set: kind 'gen' -> [GenExample], 'mc' -> [MCExample]; optionally filter families."""
  if kind not in ("gen", "mc"):
    raise ConfigError(f"unknown eval set kind {kind!r}; expected 'gen' or 'mc'")
  path = path or os.path.join(EVAL_DIR, f"{kind}.jsonl")
  if not os.path.exists(path):
    raise ConfigError(f"eval set {path} not found; regenerate it with qdllm_jax.data.tasks.export_eval_sets()")
  out = []
  with open(path) as f:
    for line in f:
      d = json.loads(line)
      if families is not None and d["family"] not in families:
        continue
      if kind == "mc":
        d["choices"] = tuple(d["choices"])
        out.append(MCExample(**d))
      else:
        out.append(GenExample(**d))
  return out
