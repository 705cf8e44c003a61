"""Packed matmul (`qdllm_jax.kernels.qmatmul`) against dense float32 and bfloat16 matmuls of the same shape.

    python3 benchmarks/bench_kernels.py                         # 4096x4096, 12288x4096, 4096x12288; tokens 1,8,512
    python3 benchmarks/bench_kernels.py --shapes 4096x4096 --tokens 1,8 --formats binary_planes,int2
    python3 benchmarks/bench_kernels.py --path interpret --shapes 256x512 --tokens 1      # kernel smoke run
    python3 benchmarks/bench_kernels.py --tokens 1 --rotate 8          # weights streamed from DRAM, as in decode

Shapes are out x in. Weights are random (uniform random bits/codes, scales in typical ranges): the kernels' cost
does not depend on the values. Formats:
  binary_planes: Quant-dLLM DAQ planes, block 128, ABMP orders (5 % of blocks at order 1, 5 % at 3, rest 2:
                 exactly 2 planes per weight on average), float16 scales;
  int2 / int3 / int4: uniform asymmetric codes, group 128, float16 scales, uint8 zero points.
For each (shape, tokens) the script times, on the default JAX backend (printed), with the same activations:
  dense f32 : y = x @ W^T, x and W float32       dense bf16: x and W bfloat16 (float32 accumulation)
  packed    : qmatmul(x, qw) for x float32 and x bfloat16 (path: by backend, or --path)
and prints milliseconds, minimum over --iters timed calls after one compile+warm-up call: wall time and, on CPU,
also process CPU time (all threads; on a shared, oversubscribed machine CPU time is the steadier measure of
work, and wall ~ cpu / cores when the machine is idle), with the speed-ups dense / packed. Weight bytes and the
true bits per weight (every stored array counted) are printed per format. Accelerator target: packed >= 4x
faster than dense bf16 at 1 token.

--rotate K gives every timed call the next of K independent copies of the weights (dense and packed), so the
working set is K times the weight bytes: with K x packed bytes above the last-level cache the packed weights are
streamed from DRAM on every call, as they are in a decode step that runs through all layers. Without it (K = 1)
a packed weight of a few MiB stays cache-resident between calls while the dense one does not, which flatters
the packed path.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.kernels import default_path, qmatmul
from qdllm_jax.quant import packed


def abmp_orders(nb: int, ratio: float = 0.05) -> np.ndarray:
  """ABMP-shaped orders: r = min(floor(nb ratio), nb // 2) blocks at 1 and at 3, the rest at 2."""
  r = min(int(nb * ratio), nb // 2)
  orders = np.full(nb, 2, np.int64)
  orders[:r], orders[nb - r:] = 1, 3
  return np.random.default_rng(nb).permutation(orders)


def make_weight(fmt: str, out: int, n_in: int, seed: int = 0):
  """Random QuantizedWeight of format `fmt` ("binary_planes" or "int<b>")."""
  rng = np.random.default_rng(seed)
  if fmt == "binary_planes":
    nb = n_in // 128
    bits = rng.integers(0, 2 ** 32, (nb, 3, out, 4), dtype=np.uint32)
    a_r = rng.uniform(0.005, 0.05, (nb, 3, out)).astype(np.float32)
    a_c = rng.uniform(0.5, 2.0, (nb, 3, 128)).astype(np.float32)
    return packed.from_binary_planes(bits, a_r, a_c, abmp_orders(nb), shape=(out, n_in))
  b = int(fmt[3:])
  codes = rng.integers(0, 2 ** b, (out, n_in), dtype=np.uint8)
  scales = rng.uniform(0.005, 0.05, (out, n_in // 128)).astype(np.float32)
  zeros = rng.integers(0, 2 ** b, (out, n_in // 128))
  return packed.from_uniform(codes, scales, zeros, bits=b, group_size=128, sym=False)


def time_ms(fn, x, ws, *, iters: int):
  """(wall, cpu): minimum milliseconds of fn(x, ws[i % K]) over `iters` calls (call i uses weight copy
  i % K), after one compile + warm-up call per copy."""
  for w in ws:
    jax.block_until_ready(fn(x, w))
  wall = cpu = float("inf")
  for i in range(iters):
    w = ws[i % len(ws)]
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(x, w))
    wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
  return wall * 1e3, cpu * 1e3


def _fmt(t, on_cpu: bool) -> str:
  return f"{t[0]:9.3f}" + (f" ({t[1]:9.3f})" if on_cpu else "")


def _ratio(a, b, on_cpu: bool) -> str:
  return f"{a[0] / b[0]:6.2f}x" + (f" ({a[1] / b[1]:6.2f}x)" if on_cpu else "")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default="4096x4096,12288x4096,4096x12288", help="comma list of OUTxIN")
  ap.add_argument("--tokens", default="1,8,512", help="comma list of token counts (rows of x)")
  ap.add_argument("--formats", default="binary_planes,int2,int3,int4")
  ap.add_argument("--path", default=None, help="force a qmatmul path (default: by backend)")
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--rotate", type=int, default=1, help="cycle through this many copies of every weight")
  args = ap.parse_args(argv)

  dev = jax.devices()[0]
  on_cpu = jax.default_backend() == "cpu"
  print(f"backend: {jax.default_backend()}  device: {dev.device_kind}  devices: {jax.device_count()}  "
        f"jax {jax.__version__}  packed path: {args.path or default_path()}  weight copies: {args.rotate}")
  print("times: ms, minimum over iterations" + ("; wall (process CPU)" if on_cpu else " (wall)"))
  dense = jax.jit(lambda x, w: jnp.einsum("ni,oi->no", x, w, preferred_element_type=jnp.float32).astype(x.dtype))
  packed_mm = jax.jit(lambda x, qw: qmatmul(x, qw, path=args.path))
  formats = args.formats.split(",")
  rows = []
  for shape in args.shapes.split(","):
    out, n_in = (int(v) for v in shape.lower().split("x"))
    k = max(1, args.rotate)
    w32 = [jnp.asarray(np.random.default_rng(1 + i).standard_normal((out, n_in)).astype(np.float32) * 0.02)
           for i in range(k)]
    w16 = [w.astype(jnp.bfloat16) for w in w32]
    qws = {f: [make_weight(f, out, n_in, seed=i) for i in range(k)] for f in formats}
    print(f"\n== W {out} x {n_in}: dense f32 {out * n_in * 4 / 2**20:.1f} MiB, bf16 {out * n_in * 2 / 2**20:.1f} MiB")
    for f, (qw, *_) in qws.items():
      print(f"   {f:14s} {qw.nbytes / 2**20:7.2f} MiB  {qw.bits_per_weight:.4f} bits/weight  "
            f"({out * n_in * 2 / qw.nbytes:.2f}x fewer bytes than bf16)")
    for n in (int(t) for t in args.tokens.split(",")):
      x32 = jnp.asarray(np.random.default_rng(n).standard_normal((n, n_in)).astype(np.float32))
      x16 = x32.astype(jnp.bfloat16)
      t32, t16 = time_ms(dense, x32, w32, iters=args.iters), time_ms(dense, x16, w16, iters=args.iters)
      print(f"   tokens {n:4d}: dense f32 {_fmt(t32, on_cpu)}   dense bf16 {_fmt(t16, on_cpu)}")
      for f, qw in qws.items():
        p32 = time_ms(packed_mm, x32, qw, iters=args.iters)
        p16 = time_ms(packed_mm, x16, qw, iters=args.iters)
        rows.append(dict(out=out, n_in=n_in, tokens=n, format=f, dense_f32=t32, dense_bf16=t16,
                         packed_f32=p32, packed_bf16=p16))
        print(f"     {f:14s} x f32: {_fmt(p32, on_cpu)}  dense f32/packed {_ratio(t32, p32, on_cpu)}   "
              f"x bf16: {_fmt(p16, on_cpu)}  dense bf16/packed {_ratio(t16, p16, on_cpu)}")
  return rows


if __name__ == "__main__":
  main()
