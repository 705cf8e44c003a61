"""Metric arithmetic of the suite against hand-computed values and brute force."""
import numpy as np
import pytest

from qdllm_jax.data import corpus, sequences
from qdllm_jax.errors import ConfigError
from qdllm_jax.eval.elbo import ElboResult
from qdllm_jax.eval.protocols import PerplexitySpec
from qdllm_jax.eval.suite import (
  choice_accuracy,
  choice_nll,
  corpus_windows,
  exact_match,
  left_pad,
  normalize_answer,
  perplexity_summary,
)


def test_choice_accuracy_hand_computed():
  scores = [[-1.0, -2.0, -3.0], [-3.0, -0.5, -9.0], [0.0, 0.0, -1.0], [-7.0, -6.0, -5.0]]
  # argmax: 0, 1, 0 (tie -> lowest index), 2
  assert choice_accuracy(scores, [0, 0, 1, 2]) == pytest.approx(2 / 4)
  assert choice_accuracy(scores, [0, 1, 0, 2]) == 1.0
  assert choice_accuracy([np.array([-2.0, -1.0])], [0]) == 0.0
  with pytest.raises(ConfigError):
    choice_accuracy(scores, [0, 1])


def test_choice_nll_hand_computed():
  # -log softmax: [ln(e^0 + e^-1) - 0, ln(2 e^-1) + 1] averaged
  want = (np.log(1 + np.exp(-1.0)) + np.log(2.0)) / 2
  assert choice_nll([[0.0, -1.0], [-1.0, -1.0]], [0, 1]) == pytest.approx(want, rel=1e-12)
  assert choice_nll([[-1000.0, 0.0]], [1]) == pytest.approx(0.0, abs=1e-12)  # no overflow at large margins
  assert choice_nll([[-1000.0, 0.0]], [0]) == pytest.approx(1000.0, rel=1e-12)


@pytest.mark.parametrize("pred,ref,ok", [
    (" y e j z z", " y e j z z", True), ("y e j z z\n", " y e j z z", True), ("  2 4 7 ", "2 4 7", True),
    ("y  e", "y e", False), ("Y e", "y e", False), ("y e.", "y e", False), ("", " ", True), ("", "a", False)])
def test_exact_match_normalisation(pred, ref, ok):
  assert exact_match(pred, ref) is ok
  assert normalize_answer(pred) == pred.strip()


def test_perplexity_aggregation_is_token_weighted():
  res = ElboResult(nll_bound=np.array([10.0, 20.0, 8.0]), nll_stderr=np.array([1.0, 2.0, 2.0]),
                   n_tokens=np.array([4, 8, 2]))
  s = perplexity_summary(res)
  assert s["nats_per_token"] == pytest.approx(38.0 / 14.0)
  assert s["elbo_ppl"] == pytest.approx(np.exp(38.0 / 14.0))
  assert s["stderr_nats_per_token"] == pytest.approx(3.0 / 14.0)
  assert s["n_tokens"] == 14 and s["n_windows"] == 3
  mean_of_ppls = np.mean(np.exp(res.nll_bound / res.n_tokens))
  assert abs(s["elbo_ppl"] - mean_of_ppls) > 0.1  # not the mean of per-window perplexities


def test_left_pad_brute_force():
  ids, am = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
  np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8], [0, 9, 10]])
  np.testing.assert_array_equal(am, [[1, 1, 1], [0, 0, 1], [0, 1, 1]])


def test_corpus_windows_are_evenly_spaced_stream_slices(small_tok):
  stream = sequences.encode_stream(small_tok, corpus.load_splits()["heldout"])
  n_all = stream.size // 64
  wins = corpus_windows(small_tok, PerplexitySpec(window=64, n_windows=5, n_mc=8, mc_batch=8))
  ks = [int(np.floor(i * (n_all - 1) / 4)) for i in range(5)]
  assert wins.shape == (5, 64) and wins.dtype == np.int32
  for w, k in zip(wins, ks):
    np.testing.assert_array_equal(w, stream[64 * k:64 * (k + 1)])
  assert corpus_windows(small_tok, PerplexitySpec(window=64, n_windows=None, n_mc=8, mc_batch=8)).shape == (n_all, 64)
