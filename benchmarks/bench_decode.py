"""Diffusion decoding (`llada_generate`) on packed weights against dense weights, side by side in one run.

    python3 benchmarks/bench_decode.py --tiny_checkpoint runs/tiny/checkpoint     # both parts (CPU: minutes)
    python3 benchmarks/bench_decode.py --parts stack --blocks 2 --batches 1,8     # the 8B-shaped stack only
    python3 benchmarks/bench_decode.py --parts stack --formats int2 --steps 2     # a quick smoke run

Part "tiny": the shipped tiny LLaDA (qdllm_jax/shipped/tiny-llada, float32) against its quantized checkpoint
(the launch's WORKDIR/checkpoint, packed weights on the backend's kernels). Part "stack": a random LLaDA-8B-shaped
stack of --blocks blocks (d_model 4096, 32 heads, SwiGLU 12288; a --vocab-sized embedding and head instead of
126464, so the blocks dominate), dense bfloat16 against packed weights of every format (binary_planes: DAQ planes
with ABMP orders, 2.26 bits; int2 / int3 / int4: uniform g128; bench_kernels.make_weight), activations bfloat16.

Each configuration decodes a random prompt of --prompt tokens plus --gen tokens in --steps steps (one block, so one
LLaDA step = one forward over the whole canvas) at each batch size of --batches. Printed per row:
  tokens/s        batch * gen / seconds (minimum over --iters timed runs after a compile + warm-up run)
  step ms         seconds / steps
  weight MB/token bytes of the block linears (dense: 2 or 4 bytes per weight; packed: every stored array) read
                  once per step, times steps / (batch * gen): what decoding one token costs in weight traffic
  XLA peak MiB    arguments + temporaries + outputs of the compiled forward at this canvas (memory_analysis), a
                  deterministic per-configuration figure on every backend; on an accelerator also the device's
                  peak_bytes_in_use after the run
and the ratios packed / dense (tokens/s, weight bytes). The host's peak RSS for the whole run is printed last.
"""
from __future__ import annotations

import argparse
import json
import resource
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


def stack_models(blocks: int, vocab: int, formats: list[str]) -> dict:
  """{"dense bf16": Model, fmt: Model with packed block linears} sharing the dense embedding, norms and head."""
  cfg = llada_config(LLADA_8B, n_layers=blocks, vocab_size=vocab, embedding_size=vocab, mask_token_id=vocab - 1,
                     eos_token_id=0, pad_token_id=0, bos_token_id=1)
  rng = np.random.default_rng(0)
  shapes = transformer.param_shapes(cfg)

  def dense(shape, name):
    if "norm" in name:
      return jnp.ones(shape, jnp.bfloat16)
    return jnp.asarray((rng.standard_normal(shape, np.float32) * 0.02)).astype(jnp.bfloat16)
  top = {k: dense(v, k) for k, v in shapes.items() if k != "blocks"}
  dense_blocks = [{k: dense(v, k) for k, v in b.items()} for b in shapes["blocks"]]
  models = {"dense bf16": Model(dict(top, blocks=dense_blocks), cfg)}
  for f in formats:
    blks = [{k: (make_weight(f, *v, seed=10 * i + j) if k in transformer.LINEARS else b[k])
             for j, (k, v) in enumerate(shapes["blocks"][i].items())} for i, b in enumerate(dense_blocks)]
    models[f] = Model(dict(top, blocks=blks), cfg)
  return models


def _device_peak() -> str:
  dev, _ = engine_lib.memory_peaks()
  return "" if dev is None else f"{dev / 2**20:9.0f}"


def bench(title, models: dict, base: str, args, prompt, gen, steps, rows: list):
  """Time every model at every batch size; print one line each and append a dict to `rows`."""
  on_acc = jax.default_backend() != "cpu"
  print(f"\n== {title}: prompt {prompt}, gen {gen}, steps {steps} (one block), iters {args.iters}")
  print(f"   {'weights':12s} {'batch':>5s} {'tokens/s':>9s} {'step ms':>9s} {'weight MB/token':>15s} "
        f"{'XLA peak MiB':>12s}" + (f" {'device peak MiB':>15s}" if on_acc else "") + "   vs " + base)
  for batch in args.batches:
    ref = None
    for name, model in models.items():
      r = run_config(model, batch=batch, prompt=prompt, gen=gen, steps=steps, iters=args.iters)
      wbytes = linear_bytes(model.params) * steps / (batch * gen)
      peak = forward_peak(model, batch, prompt + gen)
      ratio = ""
      if name == base:
        ref = (r["tokens_per_s"], wbytes)
      elif ref is not None:
        ratio = f"tokens/s x{r['tokens_per_s'] / ref[0]:.2f}  weight bytes x{wbytes / ref[1]:.3f}"
      rows.append(dict(part=title.split(" ")[0], weights=name, batch=batch, tokens_per_s=r["tokens_per_s"],
                       step_ms=r["step_ms"], weight_mb_per_token=wbytes / 1e6, xla_peak_mib=peak / 2**20,
                       speedup_vs_base=r["tokens_per_s"] / ref[0] if ref else None))
      print(f"   {name:12s} {batch:5d} {r['tokens_per_s']:9.2f} {r['step_ms']:9.1f} {wbytes / 1e6:15.2f} "
            f"{peak / 2**20:12.1f}" + (f" {_device_peak():>15s}" if on_acc else "") + f"   {ratio}", flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--parts", default="tiny,stack")
  ap.add_argument("--tiny_fp", default="qdllm_jax/shipped/tiny-llada")
  ap.add_argument("--tiny_checkpoint", default="runs/tiny/checkpoint")
  ap.add_argument("--blocks", type=int, default=1)
  ap.add_argument("--vocab", type=int, default=4096)
  ap.add_argument("--formats", default="binary_planes,int2,int3,int4")
  ap.add_argument("--batches", default="1,8", type=lambda s: [int(v) for v in s.split(",")])
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--gen", type=int, default=16)
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--iters", type=int, default=2)
  ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
  args = ap.parse_args(argv)
  dev = jax.devices()[0]
  print(f"backend: {jax.default_backend()}  device: {dev.device_kind}  jax {jax.__version__}  packed path by "
        f"backend: {default_path()} (a weight the kernel cannot take falls back to xla; the tiny part prints them)")
  parts, rows = args.parts.split(","), []
  if "tiny" in parts:
    models = {"fp32 dense": load_pretrained(args.tiny_fp), "packed": load_quantized(args.tiny_checkpoint)}
    print(f"tiny: {args.tiny_fp} vs {args.tiny_checkpoint}: "
          f"{engine_lib.describe_path(models['packed'].params, 'quantized', False)}")
    bench("tiny LLaDA (qdllm_jax/shipped/tiny-llada) fp32 vs its quantized checkpoint", models, "fp32 dense", args,
          args.prompt, 32, 32, rows)
  if "stack" in parts:
    models = stack_models(args.blocks, args.vocab, args.formats.split(","))
    bench(f"LLaDA-8B-shaped stack, {args.blocks} block(s), vocab {args.vocab}, random weights", models,
          "dense bf16", args, args.prompt, args.gen, args.steps, rows)
  print(f"\nhost peak RSS of the run: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"backend": jax.default_backend(), "device": dev.device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
