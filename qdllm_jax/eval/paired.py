"""Paired comparison of two evaluations (e.g. a quantized model against its FP source) under one protocol and seed.

Two `evaluate(..., seed=s, return_details=True)` results with the same protocol and seed share every random draw
(ELBO masks, MC noise, sampler), so per-item differences cancel the Monte-Carlo noise that each result's own
standard error carries: the honest question "is the candidate worse than the reference?" is answered by the
paired statistics below, not by comparing two error bars.

  ELBO: per window w, D_w = B_cand(w) - B_ref(w) (nats), N_w scored tokens;
        delta = sum_w D_w / sum_w N_w   (the change of elbo_nats_per_token),
        se    = sqrt(W / (W - 1) * sum_w (D_w - delta N_w)^2) / sum_w N_w   (ratio estimator, W windows).
  Multiple choice (per family and "all"): per example d_i = NLL_cand(i) - NLL_ref(i) of the correct choice;
        delta = mean d, se = sd(d) / sqrt(n).
  Generation exact match (per family and "all"): d_i = hit_cand(i) - hit_ref(i) in {-1, 0, 1}; delta, se as above
        (0 when no example changes).
Every entry is {"delta", "se", "t"} with t = delta / se (inf/-inf/0 for se = 0), and "n" the number of items.
Positive ELBO / NLL deltas and negative EM deltas mean the candidate is worse.
"""
from __future__ import annotations

import json

import numpy as np

from qdllm_jax.errors import ConfigError

DETAIL_KEYS = ("window_nll", "window_tokens", "choice_nll", "gen_hits")  # the per-item results compare reads


def paired_stat(delta: float, se: float, n: int) -> dict:
  """{"delta", "se", "t" = delta / se (+-inf for a nonzero delta with se 0), "n"}: one paired comparison's record."""
  t = delta / se if se > 0 else (0.0 if delta == 0 else float(np.sign(delta)) * float("inf"))
  return {"delta": float(delta), "se": float(se), "t": float(t), "n": int(n)}


def paired_mean(d) -> dict:
  """{"delta": mean d, "se": sd(d, ddof=1) / sqrt(n), "t", "n"} of per-item differences d [n] (n >= 2)."""
  d = np.asarray(d, np.float64).reshape(-1)
  if d.size < 2:
    raise ConfigError(f"a paired comparison needs >= 2 items; got {d.size}.")
  return paired_stat(d.mean(), d.std(ddof=1) / np.sqrt(d.size), d.size)


def paired_ratio(diff, n_tokens) -> dict:
  """Token-weighted change sum D / sum N with its ratio-estimator standard error (module docstring)."""
  diff, n_tokens = np.asarray(diff, np.float64), np.asarray(n_tokens, np.float64)
  w = diff.size
  if w < 2 or n_tokens.shape != diff.shape:
    raise ConfigError(f"a paired ELBO comparison needs >= 2 windows with one token count each; got {w} windows and "
                      f"{n_tokens.size} counts.")
  delta = diff.sum() / n_tokens.sum()
  se = np.sqrt(w / (w - 1) * np.sum((diff - delta * n_tokens) ** 2)) / n_tokens.sum()
  return paired_stat(delta, se, w)


def _by_family(per_item: dict, fn) -> dict:
  out = {f: fn(v) for f, v in per_item.items()}
  out["all"] = fn(np.concatenate([np.asarray(v, np.float64) for v in per_item.values()]))
  return out


def _canonical(card) -> str:
  """The protocol card as sorted JSON (a card read back from JSON has lists where the live one has tuples)."""
  return json.dumps(card, sort_keys=True, default=str)


def compare(reference: dict, candidate: dict) -> dict:
  """Paired statistics of candidate - reference (module docstring) for every metric group both results have.

  Both must come from `evaluate(..., return_details=True)` with the same protocol card and seed or key (so they
  share the random draws; results record the key's raw words as "key_data"); raises ConfigError otherwise,
  before computing anything.
  Returns {"elbo_nats_per_token": stat} (if the protocol has perplexity), {"mc_nll": {family: stat}},
  {"gen_em": {family: stat}}; stat = {"delta", "se", "t", "n"}.
  """
  for name, r in (("reference", reference), ("candidate", candidate)):
    if "details" not in r:
      raise ConfigError(f"the {name} result has no per-item details; evaluate it with return_details=True.")
  if _canonical(reference["protocol"]) != _canonical(candidate["protocol"]):
    raise ConfigError("the two results use different protocols (or limits / mask ids); a paired comparison needs "
                      "both evaluated under the same protocol card.")
  if reference.get("key_data") is None or reference.get("key_data") != candidate.get("key_data"):
    raise ConfigError(f"seeds {reference.get('seed')} and {candidate.get('seed')} (or keys) differ: a paired "
                      "comparison needs both results from the same seed or key (the same random draws); "
                      "re-evaluate with seed=...")
  rd, cd = reference["details"], candidate["details"]
  out = {}
  if "window_nll" in rd:
    out["elbo_nats_per_token"] = paired_ratio(np.asarray(cd["window_nll"]) - np.asarray(rd["window_nll"]),
                                              rd["window_tokens"])
  if "choice_nll" in rd:
    out["mc_nll"] = _by_family({f: np.asarray(cd["choice_nll"][f]) - np.asarray(v)
                                for f, v in rd["choice_nll"].items()}, paired_mean)
  if "gen_hits" in rd:
    out["gen_em"] = _by_family({f: np.asarray(cd["gen_hits"][f], np.float64) - np.asarray(v, np.float64)
                                for f, v in rd["gen_hits"].items()}, paired_mean)
  return out


def flatten(comparison: dict) -> list:
  """[(name, stat)] of a `compare` result: elbo_nats_per_token, mc_nll/<family>, gen_em/<family>."""
  out = []
  for group, v in comparison.items():
    out += [(group, v)] if "delta" in v else [(f"{group}/{f}", s) for f, s in v.items()]
  return out
