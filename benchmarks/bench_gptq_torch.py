"""Side by side on the same CPU, W and H: qdllm-jax's GPTQ against a PyTorch transcription of the original
GPTQ algorithm (IST-DASLab `gptq.py` `GPTQ.fasterquant` + `quant.py` `Quantizer`, min/max asymmetric grid,
`blocksize=128`, `percdamp=0.01`, `groupsize=128`, `actorder=False`).

    python3 benchmarks/bench_gptq_torch.py                 # 4096x4096, 2-bit g128 (needs torch==2.13.0 CPU)
    python3 benchmarks/bench_gptq_torch.py --shapes 4096x4096,4096x12288 --bits 2,4

The transcription follows the original step for step: dead columns, damping by percdamp * mean(diag H),
Hinv = chol_upper(cholesky_inverse(chol(H))), lazy blocks of 128 columns, group parameters found from the
(updated) weights when a group starts, err = (w - q) / Hinv_jj, in-block and cross-block updates.
Printed: wall seconds (min over repeats, Cholesky included) of both, their ratio, and the layer loss
tr((W - W^) H (W - W^)^T) of both on the same W and H (the layer from bench_solvers.make_layer).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def torch_gptq(w, h, bits: int, groupsize: int = 128, blocksize: int = 128, percdamp: float = 0.01):
  """The original GPTQ `fasterquant` in PyTorch (float32). w [out, in], h [in, in] torch tensors -> W^ [out, in]."""
  import torch
  maxq = 2 ** bits - 1

  def find_params(x):
    xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0]))
    xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0]))
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1, 1
    scale = (xmax - xmin) / maxq
    return scale, torch.round(-xmin / scale)

  def quantize(x, scale, zero):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)

  W = w.clone().float()
  H = h.clone()
  cols = W.shape[1]
  dead = torch.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  Q = torch.zeros_like(W)
  damp = percdamp * torch.mean(torch.diag(H))
  idx = torch.arange(cols)
  H[idx, idx] += damp
  H = torch.linalg.cholesky(H)
  H = torch.cholesky_inverse(H)
  Hinv = torch.linalg.cholesky(H, upper=True)
  scale = zero = None
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    W1 = W[:, i1:i2].clone()
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      col = W1[:, i]
      d = Hinv1[i, i]
      if (i1 + i) % groupsize == 0:
        scale, zero = find_params(W[:, i1 + i:i1 + i + groupsize])
      q = quantize(col, scale, zero)
      Q1[:, i] = q
      err1 = (col - q) / d
      W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
      Err1[:, i] = err1
    Q[:, i1:i2] = Q1
    W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
  return Q


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default="4096x4096")
  ap.add_argument("--bits", default="2")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  a = ap.parse_args(argv)
  import jax
  import torch
  from bench_solvers import make_layer
  from qdllm_jax.quant.api import quantize_weight
  from qdllm_jax.quant.hessian import layer_loss
  torch.set_num_threads(a.threads)
  print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} "
        f"({jax.default_backend()}), {os.cpu_count()} cpus")

  def timed(fn):
    best, out = float("inf"), None
    for _ in range(a.repeats):
      t = time.perf_counter()
      out = fn()
      best = min(best, time.perf_counter() - t)
    return best, out

  for shape in a.shapes.split(","):
    out, n = map(int, shape.split("x"))
    w, h = make_layer(out, n)
    wt, ht = torch.from_numpy(np.asarray(w)), torch.from_numpy(np.asarray(h))
    for bits in map(int, a.bits.split(",")):
      jax_fn = lambda: np.asarray(quantize_weight(w, h, method="gptq", bits=bits, group_size=128).dequantize())  # noqa: E731,B023
      jax_fn()  # compile once per shape
      t_jax, q_jax = timed(jax_fn)
      t_ref, q_ref = timed(lambda: torch_gptq(wt, ht, bits).numpy())  # noqa: B023
      l_jax, l_ref = float(layer_loss(w, q_jax, h)), float(layer_loss(w, q_ref, h))
      print(f"{shape} {bits}-bit g128: original (torch) {t_ref:.2f} s, qdllm-jax {t_jax:.2f} s, speed-up "
            f"{t_ref / t_jax:.2f}x | layer loss torch {l_ref:.4e}, jax {l_jax:.4e} (ratio {l_jax / l_ref:.4f}) | "
            f"max |W^_jax - W^_torch| {np.max(np.abs(q_jax - q_ref)):.3g}")


if __name__ == "__main__":
  main()
