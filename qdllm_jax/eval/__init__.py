"""Evaluation: likelihood estimators, the ELBO, protocols and the suite.

    from qdllm_jax.eval import evaluate, get_protocol
    result = evaluate(model, tokenizer, "tiny", seed=0)      # metrics + the protocol card
    compare(evaluate(fp, tok, seed=0, return_details=True), evaluate(q, tok, seed=0, return_details=True))
Real benchmarks (lm-eval, optional extra): qdllm_jax.eval.lm_eval_adapter (QdllmLM, run_protocol).
"""
from qdllm_jax.eval.elbo import ElboResult, elbo_nll
from qdllm_jax.eval.paired import compare
from qdllm_jax.eval.protocols import PROTOCOLS, GenerationTask, LikelihoodTask, PerplexitySpec, Protocol, get_protocol
from qdllm_jax.eval.suite import (
                                  choice_accuracy,
                                  corpus_windows,
                                  evaluate,
                                  exact_match,
                                  gumbel_precision_report,
                                  perplexity_summary,
)

__all__ = ["compare", "PROTOCOLS", "GenerationTask", "LikelihoodTask", "PerplexitySpec", "Protocol", "get_protocol",
           "choice_accuracy", "corpus_windows", "elbo_nll", "evaluate", "exact_match", "gumbel_precision_report",
           "perplexity_summary"]
