"""The suite separates the shipped model from its 2-bit RTN copy on every metric (needs assets/tiny-llada)."""
import numpy as np
import pytest

from qdllm_jax.data import tasks
from qdllm_jax.eval import compare
from qdllm_jax.eval.suite import evaluate
from qdllm_jax.models.transformer import LINEARS

from eval_common import HAS_SHIPPED

pytestmark = [pytest.mark.slow,
              pytest.mark.xfail(strict=True, reason="issue 3 open: on the shipped tiny model RTN-2 degrades generation "
                                "but not MC or ELBO (RTN-2 g128 does little damage to 4 small blocks; easy MC "
                                "families; a model past the unigram plateau is no more sensitive, and its perplexity "
                                "needs ~16x the MC rows for the 0.5 % seed agreement); docs/evaluation.md"),
              pytest.mark.skipif(not HAS_SHIPPED, reason="assets/tiny-llada/model.safetensors not built yet")]


def rtn2_copy(model, group_size=128, packed=False):
  """Every block linear replaced by its 2-bit RTN quantization: the packed QuantizedWeight (the model then calls
  the packed kernel) or its float32 dequantization (faster on CPU); embeddings, head and norms kept in float."""
  from qdllm_jax.quant import quantize_weight
  blocks = []
  for blk in model.params["blocks"]:
    blk = dict(blk)
    for name in LINEARS:
      qw = quantize_weight(np.asarray(blk[name], np.float32), None, method="rtn", bits=2, group_size=group_size)
      blk[name] = qw if packed else qw.dequantize()
    blocks.append(blk)
  return model.replace_params(dict(model.params, blocks=blocks))


def test_rtn2_is_worse_on_every_metric(shipped):
  """FP vs 2-bit RTN (same seed, so the paired statistics of eval.paired.compare apply). The likelihood metrics must be
  clearly worse: held-out ELBO and choice NLL by a paired t > 3 over the same windows / examples, answer NLL
  > 1.3 x (about 10 standard errors); accuracies may saturate (both models solve the easy families), so they must
  not be better, and gen_em/all must drop by > 3 binomial sd."""
  model, tok = shipped
  fp = evaluate(model, tok, "tiny", seed=0, return_details=True)
  q = evaluate(rtn2_copy(model), tok, "tiny", seed=0, return_details=True)
  f, g, c = fp["metrics"], q["metrics"], compare(fp, q)
  print("fp", f, "\nrtn2", g, "\npaired", c)
  assert c["elbo_nats_per_token"]["t"] > 3
  for fam in tasks.MC_FAMILIES + ("all",):
    assert c["mc_nll"][fam]["t"] > 3, fam
    assert g[f"mc_acc/{fam}"] <= f[f"mc_acc/{fam}"], fam
  for fam in tasks.GEN_FAMILIES + ("all",):
    assert g[f"gen_nll/{fam}"] > 1.3 * f[f"gen_nll/{fam}"], fam
    assert g[f"gen_em/{fam}"] <= f[f"gen_em/{fam}"], fam
  n = sum(fp["generation"]["n"].values())
  assert g["gen_em/all"] < f["gen_em/all"] - 3 * np.sqrt(0.25 / n)
