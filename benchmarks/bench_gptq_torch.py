"""Side by side on the same CPU, W and H: qdllm-jax's GPTQ against a PyTorch transcription of the original
GPTQ algorithm (IST-DASLab `gptq.py` `GPTQ.fasterquant` + `quant.py` `Quantizer`, min/max asymmetric grid,
`blocksize=128`, `percdamp=0.01`, `groupsize=128`, `actorder=False`).

    python3 benchmarks/bench_gptq_torch.py                 # 4096x4096, 2-bit g128 (needs torch==2.13.0 CPU)
    python3 benchmarks/bench_gptq_torch.py --shapes 4096x4096,4096x12288 --bits 2,4

The transcription follows the original step for step: dead columns, damping by percdamp * mean(diag H),
Hinv = chol_upper(cholesky_inverse(chol(H))), lazy blocks of 128 columns, group parameters found from the
(updated) weights when a group starts, err = (w - q) / Hinv_jj, in-block and cross-block updates.
Printed: wall seconds (median and range over --repeats rounds that time both, the order alternating,
Cholesky and qdllm-jax's input checks and packing included, compile excluded; each side timed to its own
product: the original's fake-quantized Q, qdllm-jax's packed weight), the ratio of the medians and of each
round, the 1-minute load average before and after each round, and the layer loss tr((W - W^) H (W - W^)^T)
of both on the same W and H (the layer from bench_solvers.make_layer). torch runs with OMP_WAIT_POLICY=PASSIVE
unless the environment sets it.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

# torch's OpenMP threads busy-wait between parallel regions unless told otherwise, which on a shared 2-core
# machine steals the other process's core; set before torch is imported (an explicit setting is kept)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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


def _load() -> str:
  with open("/proc/loadavg") as f:
    return f.read().split()[0]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default="4096x4096")
  ap.add_argument("--bits", default="2")
  ap.add_argument("--repeats", type=int, default=3, help="rounds; each times both, the order alternating")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  ap.add_argument("--daq", action="store_true", help="also time the Quant-dLLM solve (quant_dllm w2 ABMP 5 %%)")
  a = ap.parse_args(argv)
  import jax
  import torch
  from bench_solvers import make_layer

  from qdllm_jax.quant.api import quantize_weight
  from qdllm_jax.quant.hessian import layer_loss
  torch.set_num_threads(a.threads)
  print(f"torch {torch.__version__} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), jax {jax.__version__} ({jax.default_backend()}), "
        f"{os.cpu_count()} cpus, load {_load()}")

  def once(fn):  # (wall s, process CPU s: all threads of this process, torch's and XLA's alike)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - t, time.process_time() - c), out

  for shape in a.shapes.split(","):
    out, n = map(int, shape.split("x"))
    w, h = make_layer(out, n)
    wt, ht = torch.from_numpy(np.asarray(w)), torch.from_numpy(np.asarray(h))
    for bits in map(int, a.bits.split(",")):
      # each side timed to its own product: the original's fake-quantized Q, qdllm-jax's packed weight (codes,
      # scales, zeros, ready on the device); the dequantized copy for the loss comparison is made untimed
      fns = {"jax": lambda: jax.block_until_ready(quantize_weight(w, h, method="gptq", bits=bits,  # noqa: B023
                                                                  group_size=128)),
             "torch": lambda: torch_gptq(wt, ht, bits)}  # noqa: B023
      if a.daq and bits == 2:
        fns["daq"] = lambda: jax.block_until_ready(quantize_weight(w, h, method="quant_dllm", bits=2,  # noqa: B023
                                                                   group_size=128, abmp_ratio=0.05))
      res = {k: f() for k, f in fns.items() if k != "torch"}  # compile once per shape
      times, cpu = {k: [] for k in fns}, {k: [] for k in fns}
      loads = [_load()]
      for r in range(a.repeats):  # alternate: jax, torch, (daq) | torch, jax, (daq) | ...
        order = ["jax", "torch"] if r % 2 == 0 else ["torch", "jax"]
        for k in order + [k for k in fns if k not in ("jax", "torch")]:
          (t, c), res[k] = once(fns[k])
          times[k].append(t)
          cpu[k].append(c)
        loads.append(_load())
      med = {k: float(np.median(v)) for k, v in times.items()}
      res = {k: np.asarray(v.dequantize()) if k != "torch" else v.numpy() for k, v in res.items()}
      l_jax, l_ref = float(layer_loss(w, res["jax"], h)), float(layer_loss(w, res["torch"], h))
      line = (f"{shape} {bits}-bit g128: original (torch) median {med['torch']:.2f} s "
              f"[{min(times['torch']):.2f}-{max(times['torch']):.2f}], qdllm-jax GPTQ median {med['jax']:.2f} s "
              f"[{min(times['jax']):.2f}-{max(times['jax']):.2f}] -> jax/torch {med['jax'] / med['torch']:.2f} "
              f"(per round {', '.join(f'{j / t:.2f}' for j, t in zip(times['jax'], times['torch']))})")
      if "daq" in med:
        line += f" | Quant-dLLM median {med['daq']:.2f} s ({med['daq'] / med['torch']:.2f}x the original GPTQ)"
      mc = {k: float(np.median(v)) for k, v in cpu.items()}
      line += (f"\n  process CPU s median: torch {mc['torch']:.2f}, jax {mc['jax']:.2f} "
               f"(jax/torch {mc['jax'] / mc['torch']:.2f})")
      print(line + f"\n  layer loss torch {l_ref:.4e}, jax {l_jax:.4e} (ratio {l_jax / l_ref:.4f}) | "
            f"max |W^_jax - W^_torch| {np.max(np.abs(res['jax'] - res['torch'])):.3g} | load {' '.join(loads)}",
            flush=True)


if __name__ == "__main__":
  main()
