"""Shared by the checkpoint tests: the tiny LLaDA config and a mixed quantized params tree.

The quantized tree is built directly with `quantize_weight` on a tiny random model (H = X^T X from a random
X), one method/format per linear (both formats, ABMP orders, sym / asym, act-order g_idx, bfloat16 scales, 2/3/4
bits, one linear left dense), the same in both blocks.
"""
import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.models import transformer
from qdllm_jax.models.llada import LLADA_TINY_TEST, llada_config
from qdllm_jax.quant import quantize_weight

CFG = llada_config(LLADA_TINY_TEST)
G = 32
BLOCK0 = {"q": dict(method="quant_dllm", bits=2), "k": dict(method="quant_dllm", bits=2, abmp_ratio=0.0),
          "v": dict(method="gptq", bits=2, act_order=True), "o": dict(method="rtn", bits=3, sym=True),
          "gate": dict(method="rtn", bits=2, scale_dtype="bfloat16"), "up": dict(method="rtn", bits=4),
          "down": None}


def _hessian(n_in, seed):
  x = np.random.default_rng(seed).standard_normal((64, n_in)).astype(np.float32)
  return jnp.asarray(x.T @ x)


def build_qparams(dtype=jnp.float32, seed=0):
  params = transformer.init_params(CFG, jax.random.key(seed), dtype=dtype, std=0.2)
  params = dict(params, blocks=[dict(b) for b in params["blocks"]])
  for b, blk in enumerate(params["blocks"]):
    for i, n in enumerate(transformer.LINEARS):
      kw = BLOCK0[n]
      if kw is None:
        continue
      w = blk[n].astype(jnp.float32)
      blk[n] = quantize_weight(w, _hessian(w.shape[1], 10 * b + i), group_size=G, **kw)
  return params
