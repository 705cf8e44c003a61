"""Diffusion decoding (`llada_generate`) on packed weights against dense weights, side by side in one run.

    python3 benchmarks/bench_decode.py --tiny_checkpoint runs/tiny/checkpoint     # both parts (CPU: many minutes)
    python3 benchmarks/bench_decode.py --parts stack --blocks 1 --batches 1,8     # the 8B-shaped stack only
    python3 benchmarks/bench_decode.py --parts stack --formats int2 --steps 2 --blocks 1   # a quick smoke run

Part "tiny": the shipped tiny LLaDA (qdllm_jax/shipped/tiny-llada, float32) against its quantized checkpoint
(the launch's WORKDIR/checkpoint, packed weights on the backend's kernels). Part "stack": a random LLaDA-8B-shaped
stack of --blocks blocks (default 4; d_model 4096, 32 heads, SwiGLU 12288; a --vocab-sized embedding and head instead of
126464, so the blocks dominate), dense bfloat16 against packed weights of every format (binary_planes: DAQ planes
with ABMP orders, 2.26 bits; int2 / int3 / int4: uniform g128; bench_kernels.make_weight), activations bfloat16.

Each configuration decodes a random prompt of --prompt tokens plus --gen tokens in --steps steps (one block, so one
LLaDA step = one forward over the whole canvas) at each batch size of --batches. Printed per row:
  tokens/s        batch * gen / seconds (minimum over --iters timed runs after a compile + warm-up run)
  step ms         seconds / steps
  weight MB/token bytes of the block linears (dense: 2 or 4 bytes per weight; packed: every stored array) read
                  once per step, times steps / (batch * gen): what decoding one token costs in weight traffic
  XLA peak MiB    arguments + temporaries + outputs of the compiled forward at this canvas (memory_analysis), a
                  deterministic per-configuration figure on every backend
  device peak MiB the device's peak_bytes_in_use at the end of the configuration's run (n/a where the backend
                  does not report it, e.g. CPU)
  host peak MiB   the peak RSS of the process that ran the configuration
and the ratios packed / dense (tokens/s, weight bytes). Every configuration (part, weights, batch) runs in a
fresh subprocess that builds only its own model: both peaks are process-wide maxima that never go down, so
measuring several models in one process would give every row the largest peak seen so far.
--json writes the rows (all the columns above) for benchmarks/accel_check.sh's table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_kernels import make_weight

from qdllm_jax import engine as engine_lib
from qdllm_jax.checkpoint import load_quantized
from qdllm_jax.kernels import default_path
from qdllm_jax.models import Model, load_pretrained, transformer
from qdllm_jax.models.llada import LLADA_8B, llada_config
from qdllm_jax.quant.packed import QuantizedWeight
from qdllm_jax.sampling import llada_generate


def linear_bytes(params) -> int:
  """Bytes of the block linears: dense nbytes or QuantizedWeight.nbytes."""
  total = 0
  for blk in params["blocks"]:
    for name in transformer.LINEARS:
      w = blk[name]
      total += w.nbytes if isinstance(w, QuantizedWeight) else int(np.prod(w.shape)) * jnp.dtype(w.dtype).itemsize
  return total


def forward_peak(model, batch: int, length: int) -> int:
  """XLA's memory analysis of the compiled forward at [batch, length]: arguments + temporaries + outputs (bytes)."""
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  m = jax.jit(lambda mdl, x: mdl(x)).lower(model, ids).compile().memory_analysis()
  if m is None:
    return -1
  return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes)


def run_config(model, *, batch, prompt, gen, steps, iters, seed=0):
  """dict(tokens_per_s, step_ms, seconds) of llada_generate on random prompts, minimum over iters."""
  rng = np.random.default_rng(seed)
  cfg = model.config
  ids = rng.integers(3, min(cfg.vocab_size, 1000), (batch, prompt)).astype(np.int32)
  ids[ids == cfg.mask_id] = 3

  def once():
    out = llada_generate(model, ids, mask_id=cfg.mask_id, steps=steps, gen_length=gen, block_length=gen)
    jax.block_until_ready(out)
  once()
  best = float("inf")
  for _ in range(iters):
    t0 = time.perf_counter()
    once()
    best = min(best, time.perf_counter() - t0)
  return dict(seconds=best, tokens_per_s=batch * gen / best, step_ms=1e3 * best / steps)


STACK_DIMS = "4096,32,12288"  # LLaDA-8B's d_model, heads, SwiGLU width


def stack_model(blocks: int, vocab: int, weights: str, dims: str = STACK_DIMS) -> Model:
  """A random LLaDA-8B-shaped stack: "dense bf16", or packed block linears of format `weights` with the same
  dense bfloat16 embedding, norms and head. Every tensor has its own seed, so only this model's arrays are made."""
  d, heads, ffn = (int(v) for v in dims.split(","))
  cfg = llada_config(LLADA_8B, n_layers=blocks, vocab_size=vocab, embedding_size=vocab, mask_token_id=vocab - 1,
                     eos_token_id=0, pad_token_id=0, bos_token_id=1, d_model=d, n_heads=heads, n_kv_heads=heads,
                     mlp_hidden_size=ffn)
  shapes = transformer.param_shapes(cfg)

  def dense(shape, name, seed):
    if "norm" in name:
      return jnp.ones(shape, jnp.bfloat16)
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02).astype(jnp.bfloat16)

  def block_param(i, j, k, shape):
    if k in transformer.LINEARS and weights != "dense bf16":
      return make_weight(weights, *shape, seed=10 * i + j)
    return dense(shape, k, 1000 + 10 * i + j)
  top = {k: dense(v, k, n) for n, (k, v) in enumerate(shapes.items()) if k != "blocks"}
  blks = [{k: block_param(i, j, k, v) for j, (k, v) in enumerate(b.items())} for i, b in enumerate(shapes["blocks"])]
  return Model(dict(top, blocks=blks), cfg)


def peaks() -> tuple[float | None, float]:
  """(device peak MiB or None, host peak RSS MiB) of this process."""
  dev, host = engine_lib.memory_peaks()
  return (None if dev is None else dev / 2**20), host / 2**20


def measure_one(args, part: str, weights: str, batch: int) -> dict:
  """One configuration in this (fresh) process: build its model only, time it, read both peaks."""
  if part == "tiny":
    model = load_pretrained(args.tiny_fp) if weights == "fp32 dense" else load_quantized(args.tiny_checkpoint)
    gen = steps = 32
  else:
    model = stack_model(args.blocks, args.vocab, weights, args.stack_dims)
    gen, steps = args.gen, args.steps
  r = run_config(model, batch=batch, prompt=args.prompt, gen=gen, steps=steps, iters=args.iters)
  wbytes = linear_bytes(model.params) * steps / (batch * gen)
  xla_peak = forward_peak(model, batch, args.prompt + gen)
  dev, host = peaks()
  return dict(part=part, weights=weights, batch=batch, gen=gen, steps=steps, tokens_per_s=r["tokens_per_s"],
              step_ms=r["step_ms"], weight_mb_per_token=wbytes / 1e6, xla_peak_mib=xla_peak / 2**20,
              device_peak_mib=dev, host_peak_mib=host,
              kernel_path=engine_lib.describe_path(model.params, "quantized" if part == "tiny" else "random", False),
              backend=jax.default_backend(), device=jax.devices()[0].device_kind, default_path=default_path())


def run_isolated(argv: list, part: str, weights: str, batch: int) -> dict:
  """measure_one in a fresh subprocess (same flags); its row, or RuntimeError with the child's output tail."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--one", json.dumps([part, weights, batch]),
           "--one_json", out]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not os.path.isfile(out):
      raise RuntimeError(f"{part} / {weights} / batch {batch} failed (exit {p.returncode}):\n"
                         f"{(p.stdout + p.stderr)[-3000:]}")
    with open(out, encoding="utf-8") as f:
      return json.load(f)


def _mib(v) -> str:
  return "n/a" if v is None else f"{v:.1f}"


def bench(title, part: str, names: list, base: str, args, argv, rows: list):
  """Every configuration of a part, each in its own process; one line each, appended to `rows` with ratios."""
  print(f"\n== {title} (iters {args.iters}; one process per row)")
  print(f"   {'weights':12s} {'batch':>5s} {'tokens/s':>9s} {'step ms':>9s} {'weight MB/token':>15s} "
        f"{'XLA peak MiB':>12s} {'device peak MiB':>15s} {'host peak MiB':>13s}   vs {base}")
  for batch in args.batches:
    ref = None
    for name in names:
      r = run_isolated(argv, part, name, batch)
      ratio = ""
      if name == base:
        ref = r
      elif ref is not None:
        ratio = (f"tokens/s x{r['tokens_per_s'] / ref['tokens_per_s']:.2f}  weight bytes "
                 f"x{r['weight_mb_per_token'] / ref['weight_mb_per_token']:.3f}")
      r["speedup_vs_base"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref and name != base else None
      rows.append(r)
      print(f"   {name:12s} {batch:5d} {r['tokens_per_s']:9.2f} {r['step_ms']:9.1f} {r['weight_mb_per_token']:15.2f} "
            f"{r['xla_peak_mib']:12.1f} {_mib(r['device_peak_mib']):>15s} {r['host_peak_mib']:13.0f}   {ratio}",
            flush=True)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--parts", default="tiny,stack")
  ap.add_argument("--tiny_fp", default="qdllm_jax/shipped/tiny-llada")
  ap.add_argument("--tiny_checkpoint", default="runs/tiny/checkpoint")
  ap.add_argument("--blocks", type=int, default=4, help="blocks of the 8B-shaped stack (default 4)")
  ap.add_argument("--stack_dims", default=STACK_DIMS,
                  help=f"d_model,heads,ffn of the stack (default {STACK_DIMS}: LLaDA-8B; smaller for a smoke test)")
  ap.add_argument("--vocab", type=int, default=4096)
  ap.add_argument("--formats", default="binary_planes,int2,int3,int4")
  ap.add_argument("--batches", default="1,8", type=lambda s: [int(v) for v in s.split(",")])
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--gen", type=int, default=16)
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--iters", type=int, default=2)
  ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
  ap.add_argument("--one", default=None, help=argparse.SUPPRESS)        # internal: [part, weights, batch]
  ap.add_argument("--one_json", default=None, help=argparse.SUPPRESS)   # internal: where that row goes
  return ap


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  if args.one is not None:
    row = measure_one(args, *json.loads(args.one))
    with open(args.one_json, "w", encoding="utf-8") as f:
      json.dump(row, f)
    return
  # This process never initializes a backend: a TPU is held by one process at a time, and JAX on a GPU
  # preallocates most of its memory per process, so only the measuring subprocesses may touch the device.
  parts, rows = args.parts.split(","), []
  if "tiny" in parts:
    bench(f"tiny LLaDA ({args.tiny_fp}) fp32 vs its quantized checkpoint: prompt {args.prompt}, gen 32, 32 steps",
          "tiny", ["fp32 dense", "packed"], "fp32 dense", args, argv, rows)
  if "stack" in parts:
    bench(f"LLaDA-8B-shaped stack ({args.stack_dims}), {args.blocks} block(s), vocab {args.vocab}, random weights: "
          f"prompt {args.prompt}, gen {args.gen}, {args.steps} steps (one block)", "stack",
          ["dense bf16"] + args.formats.split(","), "dense bf16", args, argv, rows)
  if rows:
    print(f"\nbackend: {rows[0]['backend']}  device: {rows[0]['device']}  jax {jax.__version__}  packed path "
          f"by backend: {rows[0]['default_path']}; the tiny checkpoint's linears: "
          + next((r["kernel_path"] for r in rows if r["part"] == "tiny" and r["weights"] == "packed"), "-"))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"backend": rows[0]["backend"] if rows else None, "device": rows[0]["device"] if rows else None,
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
