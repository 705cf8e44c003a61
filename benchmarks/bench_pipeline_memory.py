"""Peak host memory of the streaming quantization pipeline (one block + activations resident).

Writes a random-weight checkpoint of a given shape with `save_pretrained` (sharded safetensors), then, in
a fresh child process (so writing the checkpoint does not pollute the measurement), opens it with
`open_checkpoint`, runs `quantize_model` on a reduced calibration set and reports:
  * peak RSS (resource.getrusage ru_maxrss) and RSS after startup / after each block (VmRSS),
  * the accelerator's peak bytes in use (when the backend reports memory_stats),
  * the sizes it should be compared with: the whole checkpoint, one block, the top params (embedding,
    head), the activations (2 x N L D: block inputs and outputs) and the largest Hessian (F^2 float32).
A streaming pipeline's peak is ~ startup + top params + one block + activations + Hessian (+ the done
blocks' quantized params, small at 2 bits), not the model size. tracemalloc is not used: XLA buffers are
invisible to it.

  python3 benchmarks/bench_pipeline_memory.py                       # small shape, RTN, CPU (~1 min)
  python3 benchmarks/bench_pipeline_memory.py --shape llada8b --nsamples 8 --seqlen 512 --method gptq
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def _small(d, heads, layers, mlp, vocab):
  return dict(d_model=d, n_heads=heads, n_kv_heads=heads, n_layers=layers, mlp_hidden_size=mlp, vocab_size=vocab,
              embedding_size=vocab, mask_token_id=vocab - 8, eos_token_id=vocab - 7, pad_token_id=vocab - 7,
              bos_token_id=vocab - 6)


SHAPES = {  # LLaDA config.json overrides
    "tiny": _small(64, 4, 4, 192, 512),
    "small": _small(512, 8, 8, 1536, 8192),
    "medium": _small(1024, 8, 24, 2816, 16384),
    "llada8b": {},  # the real LLaDA-8B shapes
}


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _hwm_bytes() -> int:
  """Peak RSS since the last `_reset_hwm` (VmHWM)."""
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))


def _reset_hwm() -> None:
  """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def write_checkpoint(path: str, shape: str, n_layers: int | None, dtype: str, shard_bytes: int, seed: int) -> dict:
  """A random N(0, 0.02^2) LLaDA checkpoint of the given shape (every block holds the same random weights);
  returns its sizes in bytes."""
  import ml_dtypes

  from qdllm_jax.models import transformer
  from qdllm_jax.models.hf_checkpoint import save_pretrained
  from qdllm_jax.models.llada import LLADA_8B, llada_config
  over = dict(SHAPES[shape])
  if n_layers:
    over["n_layers"] = n_layers
  cfg = llada_config(LLADA_8B, **over)
  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  rng = np.random.default_rng(seed)

  def make(shape_, name):
    if "norm" in name:
      return np.ones(shape_, np_dtype)
    return (0.02 * rng.standard_normal(shape_, dtype=np.float32)).astype(np_dtype)

  shapes = transformer.param_shapes(cfg)
  params = {k: make(v, k) for k, v in shapes.items() if k != "blocks"}
  # One random block written n_layers times: the same bytes on disk per block, but the writer holds one block
  # in memory (the 8B shape would otherwise need 16 GB of host RAM just to write the file).
  block = {k: make(v, k) for k, v in shapes["blocks"][0].items()}
  params["blocks"] = [block] * cfg.n_layers
  save_pretrained(params, cfg, path, max_shard_bytes=shard_bytes)
  nbytes = lambda d: int(sum(a.nbytes for a in d.values()))  # noqa: E731
  return dict(model=nbytes({k: v for k, v in params.items() if k != "blocks"}) + sum(map(nbytes, params["blocks"])),
              block=nbytes(params["blocks"][0]), top=nbytes({k: v for k, v in params.items() if k != "blocks"}),
              d_model=cfg.d_model, mlp_hidden=cfg.mlp_hidden, n_layers=cfg.n_layers, itemsize=np_dtype.itemsize)


def _itemsize(reader) -> int:
  """Bytes per param of the checkpoint's block weights (safetensors dtype string)."""
  dt = reader.tensors[next(iter(reader.tensors))][2]
  return {"BF16": 2, "F16": 2, "F32": 4}[dt]


def _block_seconds(trace) -> list:
  return [t["t"] - (trace[i - 1]["t"] if i else 0.0) for i, t in enumerate(trace)]


def run_pipeline(ckpt: str, nsamples: int, seqlen: int, method: str, group_size: int, chunk_size: int,
                 offload: bool, spill: bool, save_blocks: int) -> dict:
  """Child process: quantize the checkpoint streaming (finished blocks spilled to disk unless spill=False), then
  save it with `save_quantized` as the launch does (top params read from the source checkpoint and blocks from
  the spill while their part is written); returns memory (peak per block and of the save) and timing numbers.
  save_blocks > 0: save a checkpoint of that many blocks, the quantized ones in turn (in-memory copies with
  --no-spill), to measure the final save of a full-depth run without quantizing every block."""
  import jax

  from qdllm_jax import checkpoint
  from qdllm_jax.calib import mcs, text_windows
  from qdllm_jax.models.hf_checkpoint import open_checkpoint
  from qdllm_jax.quant import pipeline, rules
  jax.numpy.zeros(1).block_until_ready()
  rss0 = _rss_bytes()
  reader = open_checkpoint(ckpt)
  cfg = reader.config
  stream = np.random.default_rng(0).integers(0, min(cfg.vocab_size, cfg.mask_id or cfg.vocab_size),
                                             size=nsamples * seqlen * 2).astype(np.int32)
  ids = mcs.calibration_inputs(text_windows.make_windows(stream, nsamples, seqlen, 0), cfg)
  trace = []
  table = rules.default_rules(method, 2, group_size)
  # the plan's prediction for this run, measured in this process on this backend before the run (plan_timing)
  from qdllm_jax import plan as plan_lib
  from qdllm_jax import plan_timing
  t_plan = time.perf_counter()
  rplan = rules.resolve_rules(table, cfg)
  itemsize = _itemsize(reader)
  times = plan_timing.measure_for(cfg, rplan, itemsize, int(ids.shape[0]), int(ids.shape[1]), chunk_size,
                                  plan_lib.CALIB_PASSES)
  predicted = {k: (lo / cfg.n_layers, hi / cfg.n_layers)
               for k, (lo, hi) in plan_timing.durations(times, cfg, rplan).items()}
  plan_s = time.perf_counter() - t_plan

  def on_block(state, rep):
    trace.append(dict(block=state.next_block - 1, rss=_rss_bytes(), peak=_hwm_bytes(), t=time.perf_counter() - t0,
                      rel_err=float(np.mean([r["rel_err"] for r in rep]))))
    _reset_hwm()
    print(f"block {state.next_block - 1}: rss {trace[-1]['rss'] / 2**20:.0f} MiB, peak {trace[-1]['peak'] / 2**20:.0f}"
          f" MiB, {trace[-1]['t']:.1f} s, mean rel_err {trace[-1]['rel_err']:.4f}", file=sys.stderr, flush=True)

  work = tempfile.mkdtemp(prefix="bench_mem_")
  t0 = time.perf_counter()
  _reset_hwm()
  hook = checkpoint.spilling_hook(os.path.join(work, "spill"), "bench", then=on_block) if spill else on_block
  params, report = pipeline.quantize_model(reader, ids, table, chunk_size=chunk_size, offload_activations=offload,
                                           hooks=pipeline.BlockHooks(on_block=hook))
  quant_s = time.perf_counter() - t0
  # with spill, params hold references (top tensors of the source, blocks on disk) that the save reads one by one
  save_peak = _hwm_bytes()
  if save_blocks:
    import dataclasses
    done = params["blocks"]
    copy = (lambda b: b) if spill else (lambda b: {k: jax.tree.map(np.copy, v) for k, v in b.items()})  # noqa: E731
    params = dict(params, blocks=[copy(done[i % len(done)]) for i in range(save_blocks)])
    cfg = dataclasses.replace(cfg, n_layers=save_blocks)
  from qdllm_jax.checkpoint import save_quantized
  t1 = time.perf_counter()
  save_quantized(os.path.join(work, "ckpt"), params, cfg)
  save_peak, save_s = max(save_peak, _hwm_bytes()), time.perf_counter() - t1
  del params
  import shutil
  shutil.rmtree(work, ignore_errors=True)
  dev = {}
  try:
    stats = jax.devices()[0].memory_stats() or {}
    dev = {k: stats[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}
  except Exception:  # noqa: BLE001 - not every backend reports memory
    pass
  return dict(rss_startup=rss0, peak_rss=_peak_rss_bytes(), trace=trace, device=dev, seconds=quant_s,
              predicted_per_block=predicted, plan_seconds=plan_s, plan_source=times.source,
              load=open("/proc/loadavg").read().split()[0],
              save_seconds=save_s, save_peak=save_peak, save_blocks=save_blocks or cfg.n_layers,
              matrices=len(report), backend=jax.default_backend())


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
  ap.add_argument("--n-layers", type=int, default=None, help="override the number of blocks")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  ap.add_argument("--shard-bytes", type=int, default=2**30)
  ap.add_argument("--nsamples", type=int, default=8)
  ap.add_argument("--seqlen", type=int, default=128)
  ap.add_argument("--method", default="rtn", choices=["rtn", "gptq", "quant_dllm"])
  ap.add_argument("--group-size", type=int, default=64)
  ap.add_argument("--chunk-size", type=int, default=4)
  ap.add_argument("--offload", action="store_true", help="keep activations in host memory")
  ap.add_argument("--no-spill", action="store_true", help="keep the finished blocks in memory (the old pipeline)")
  ap.add_argument("--save-blocks", type=int, default=0,
                  help="blocks in the saved checkpoint (copies of the quantized ones; 0: as quantized)")
  ap.add_argument("--ckpt", default=None, help="existing checkpoint directory (skip writing)")
  ap.add_argument("--out", default=None, help="write the JSON result here")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.child:
    print(json.dumps(run_pipeline(a.ckpt, a.nsamples, a.seqlen, a.method, a.group_size, a.chunk_size, a.offload,
                                  not a.no_spill, a.save_blocks)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = a.ckpt or os.path.join(tmp, "ckpt")
    sizes = write_checkpoint(ckpt, a.shape, a.n_layers, a.dtype, a.shard_bytes, 0) if a.ckpt is None else {}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--ckpt", ckpt, "--nsamples", str(a.nsamples),
           "--seqlen", str(a.seqlen), "--method", a.method, "--group-size", str(a.group_size),
           "--chunk-size", str(a.chunk_size), "--save-blocks", str(a.save_blocks)] + (
               ["--offload"] if a.offload else []) + (["--no-spill"] if a.no_spill else [])
    res = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
  res.update(sizes=sizes, args=vars(a))
  if sizes:
    act = 2 * a.nsamples * a.seqlen * sizes["d_model"] * sizes["itemsize"]
    hess = 4 * sizes["mlp_hidden"] ** 2
    res["expected_resident"] = dict(block=sizes["block"], top=sizes["top"], activations=act, hessian=hess,
                                    total=sizes["block"] + sizes["top"] + act + hess)
  mib = lambda b: f"{b / 2**20:9.1f} MiB"  # noqa: E731
  print(f"backend {res['backend']}, {res['matrices']} matrices in {res['seconds']:.1f} s")
  if sizes:
    print(f"checkpoint        {mib(sizes['model'])}  ({sizes['n_layers']} blocks of {mib(sizes['block']).strip()})")
    for k, v in res["expected_resident"].items():
      print(f"expected {k:<9}{mib(v)}")
  print(f"RSS at startup    {mib(res['rss_startup'])}")
  print(f"peak RSS          {mib(res['peak_rss'])}  (above startup: {mib(res['peak_rss'] - res['rss_startup'])})")
  if res["trace"]:
    print("RSS after blocks  " + " ".join(f"{t['rss'] / 2**20:.0f}" for t in res["trace"]) + " MiB")
    print("peak per block    " + " ".join(f"{t['peak'] / 2**20:.0f}" for t in res["trace"]) + " MiB")
  print(f"final save        peak {mib(res['save_peak'])} ({res['save_blocks']} blocks, {res['save_seconds']:.1f} s)")
  if res["device"]:
    print(f"device peak       {mib(res['device'].get('peak_bytes_in_use', 0))}")
  secs = _block_seconds(res["trace"])
  if secs:
    later = secs[1:] or secs
    pred = res["predicted_per_block"]["total (without evaluation)"]
    mid = float(np.median(later))
    print(f"time per block    {' '.join(f'{x:.1f}' for x in secs)} s (the first includes compilation); "
          f"median after the first {mid:.1f} s")
    print(f"plan's prediction {pred[0]:.1f}-{pred[1]:.1f} s per block (calibration "
          f"{res['predicted_per_block']['calibration'][0]:.1f}-{res['predicted_per_block']['calibration'][1]:.1f}"
          f" s, solvers {res['predicted_per_block']['solvers'][0]:.1f}-{res['predicted_per_block']['solvers'][1]:.1f}"
          f" s; kernels timed in {res['plan_seconds']:.1f} s) -> measured / predicted "
          f"{mid / pred[1]:.2f}-{mid / pred[0]:.2f} | load {res['load']}")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
