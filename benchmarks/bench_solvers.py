"""Per-layer solve time of GPTQ (2-bit, g128) and DAQ (Quant-dLLM: order 2, ABMP 5 %, 15 RSR iterations,
compensation on) on random layers, Cholesky included, after one warm-up compile.

    python3 benchmarks/bench_solvers.py                      # 4096x4096 (about a minute on 2 CPU cores)
    python3 benchmarks/bench_solvers.py --shapes 4096x4096,4096x12288 --repeats 2

Layer: W ~ N(0, 0.02^2) [out, in]; H = (2/n) sum X^T X accumulated with `hessian_update` over chunks of
X [tokens, in] whose channels are AR(1)-correlated (rho 0.5) plus a shared rank-32 component, with 4 outlier
channels scaled by 30 (tokens = 2 in). Timed: `quantize_weight` end to end (input checks, dead columns,
damping, U = chol((H + delta I)^-1), ABMP, solver, packing), then separately prepare_hessian and the solver.
Printed: wall seconds (min over repeats) with the process CPU seconds of that run (a check on a shared
machine: on 2 idle cores wall >= cpu / 2), and the layer loss tr((W - W^) H (W - W^)^T) and its relative value.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.signal import lfilter

from qdllm_jax.quant import abmp
from qdllm_jax.quant.api import quantize_weight
from qdllm_jax.quant.daq import daq_quantize
from qdllm_jax.quant.gptq import gptq_quantize
from qdllm_jax.quant.hessian import hessian_update, layer_loss, prepare_hessian, relative_sq_output_error


def make_layer(out: int, n: int, seed: int = 0, chunk: int = 2048):
  """Random W [out, n] float32 and H [n, n] float32 from correlated activations with outlier channels."""
  rng = np.random.default_rng(seed)
  w = (0.02 * rng.standard_normal((out, n))).astype(np.float32)
  v = rng.standard_normal((32, n)).astype(np.float32) * 0.3
  outl = rng.choice(n, 4, replace=False)
  h, cnt = jnp.zeros((n, n), jnp.float32), 0
  for _ in range(2 * n // chunk):
    z = lfilter([np.sqrt(1 - 0.25)], [1.0, -0.5], rng.standard_normal((chunk, n)), axis=1).astype(np.float32)
    x = z + rng.standard_normal((chunk, 32)).astype(np.float32) @ v
    x[:, outl] *= 30.0
    h, cnt = hessian_update(h, cnt, x)
  return w, np.asarray(h)


def timed(fn, repeats: int):
  """(min wall seconds, process CPU seconds of that run, result) after one warm-up call."""
  jax.block_until_ready(fn())  # warm-up compile
  best, cpu = np.inf, np.inf
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    res = jax.block_until_ready(fn())
    if time.perf_counter() - t0 < best:
      best, cpu = time.perf_counter() - t0, time.process_time() - c0
  return best, cpu, res


def bench(out: int, n: int, repeats: int, methods):
  w, h = make_layer(out, n)
  print(f"== layer {out}x{n}  (jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cpus)", flush=True)
  wj, hj = jnp.asarray(w), jnp.asarray(h)
  t_prep, c_prep, ph = timed(lambda: prepare_hessian(wj, hj), repeats)
  print(f"  prepare_hessian (dead cols, damping, chol + triangular inverse): {t_prep:.3f} s "
        f"(cpu {c_prep:.2f} s; percdamp used {ph.percdamp})", flush=True)
  cfg = {
      "gptq": dict(method="gptq", bits=2, group_size=128),
      "daq": dict(method="quant_dllm", bits=2, group_size=128, abmp_ratio=0.05, rsr_iters=15,
                  compensation=True),
  }
  for name in methods:
    kw = cfg[name]
    t_all, c_all, qw = timed(lambda: quantize_weight(w, h, **kw), repeats)
    if name == "gptq":
      solve = lambda: gptq_quantize(ph.w, ph.u, bits=2, group_size=128, scale_dtype="float16")
    else:
      orders = abmp.allocate_orders(abmp.block_salience(ph.w, ph.u), 0.05)
      solve = lambda: daq_quantize(ph.w, ph.u, orders, iters=15, compensation=True)
    t_solve, c_solve, _ = timed(solve, repeats)
    w_hat = qw.dequantize()
    loss = float(layer_loss(wj, w_hat, hj))
    rel = float(relative_sq_output_error(wj, w_hat, hj))
    print(f"  {name:5s} quantize_weight total {t_all:.3f} s (cpu {c_all:.2f}) | solver only {t_solve:.3f} s "
          f"(cpu {c_solve:.2f}) | "
          f"layer loss {loss:.4g} (relative {rel:.4f}) | {qw.bits_per_weight:.4f} bits/weight", flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default="4096x4096", help="comma list of OUTxIN, e.g. 4096x4096,4096x12288")
  ap.add_argument("--methods", default="gptq,daq")
  ap.add_argument("--repeats", type=int, default=1)
  a = ap.parse_args()
  for s in a.shapes.split(","):
    out, n = (int(x) for x in s.lower().split("x"))
    bench(out, n, a.repeats, a.methods.split(","))


if __name__ == "__main__":
  main()
