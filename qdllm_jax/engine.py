"""A loaded model ready to decode text: the one piece behind `python -m qdllm_jax.generate` and `.serve`.

  engine = load_engine("runs/tiny/checkpoint")          # quantized (launch output) or an FP HF directory
  out, stats = engine.generate([ids_a, ids_b], settings, seed=0, batch_size=8)
  text = engine.completion_text(out[0])

A quantized checkpoint runs on its packed weights: every packed linear goes through `kernels.qmatmul` (the Pallas
kernel of the backend, or the XLA path on CPU), so W^ [out, in] is never built whole; `dequantize=True`
replaces every packed weight by its dense W^ first (for comparison). Everything a user can get wrong (not a
checkpoint, a truncated one, no tokenizer, a prompt longer than the context) is checked before the weights are
read, or reported as a CheckpointError when reading them fails.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import resource
import sys
import threading
import time

import jax
import numpy as np

from qdllm_jax import kernels
from qdllm_jax.checkpoint import quantized
from qdllm_jax.errors import CheckpointError, ConfigError, QdllmError
from qdllm_jax.models import Model, load_pretrained, load_tokenizer, open_checkpoint
from qdllm_jax.quant.packed import QuantizedWeight
from qdllm_jax.sampling import settings as settings_lib

_STOP_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>")
# JAX's compile-time events (jax/_src/dispatch.py): tracing to a jaxpr, lowering to MLIR, the backend compile (or a
# persistent-cache read). Nested jits record their own spans inside the outer one, hence the union below.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def compile_timer():
  """Yields a list that, on exit, holds one float: seconds this thread spent tracing and compiling inside the
  block (the union of JAX's compile-event spans; 0.0 when every shape was already compiled)."""
  owner, spans, out = threading.get_ident(), [], []

  def listener(event, start, end, **_):
    if event in COMPILE_EVENTS and threading.get_ident() == owner:
      spans.append((start, end))
  jax.monitoring.register_event_time_span_listener(listener)
  try:
    yield out
  finally:
    jax.monitoring.unregister_event_time_span_listener(listener)
    total, reach = 0.0, float("-inf")
    for a, b in sorted(spans):
      if b > reach:
        total += b - max(a, reach)
        reach = b
    out.append(total)


def inspect_model_dir(path: str):
  """("quantized" | "hf", ModelConfig) from the directory's metadata only (no weight is read)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"--model {path!r} is not a directory; expected the launch's WORKDIR/checkpoint or a "
                          "local Hugging Face model directory (config.json + model.safetensors)")
  if os.path.isfile(os.path.join(path, quantized.SIDECAR)):
    return "quantized", quantized.read_sidecar(path)[1]
  if os.path.isfile(os.path.join(path, "checkpoint", quantized.SIDECAR)):
    raise CheckpointError(f"{path} is a launch workdir; pass its checkpoint: --model {os.path.join(path, 'checkpoint')}"
                          )
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf", open_checkpoint(path).config
  raise CheckpointError(f"{path} is not a model checkpoint: it has neither {quantized.SIDECAR} (a quantized "
                        "checkpoint written by `python -m qdllm_jax.launch`, found in WORKDIR/checkpoint) nor "
                        "config.json (an FP Hugging Face directory); pass one of those directories")


def check_context(n_prompt: int, s, config) -> None:
  """ConfigError when prompt + generated tokens exceed the model's context (config max_seq_len)."""
  total, ctx = n_prompt + s.gen_length, config.max_seq_len
  if total > ctx:
    raise ConfigError(f"the prompt has {n_prompt} tokens and {s.gen_length} are generated: {total} > the model's "
                      f"context of {ctx} tokens; shorten the prompt to at most {ctx - s.gen_length} tokens or "
                      "lower gen_length / max_tokens")


def packed_weights(params) -> list:
  """Every QuantizedWeight leaf of a params pytree."""
  return [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
          if isinstance(x, QuantizedWeight)]


def dequantize_params(params, dtype):
  """The params with every QuantizedWeight replaced by its dense W^ [out, in] in `dtype`."""
  return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, QuantizedWeight) else x, params,
                      is_leaf=lambda x: isinstance(x, QuantizedWeight))


def describe_path(params, kind: str, dequantized: bool) -> str:
  """Which matmul path the linears take, e.g. "packed kernels: xla (binary_planes x28)"."""
  qws = packed_weights(params)
  if not qws:
    return "dense (whole model dequantized: --dequantize)" if dequantized else f"dense ({kind} checkpoint)"
  paths = sorted({kernels.default_path(q) for q in qws})
  fmts = {}
  for q in qws:
    name = q.format if q.format == "binary_planes" else f"int{q.bits}"
    fmts[name] = fmts.get(name, 0) + 1
  return (f"packed kernels: {'+'.join(paths)} (" + ", ".join(f"{k} x{v}" for k, v in sorted(fmts.items()))
          + "; never dequantized whole)")


def memory_peaks() -> tuple[int | None, int]:
  """(peak device bytes in use, or None where the backend does not report it; peak host RSS bytes)."""
  stats = jax.devices()[0].memory_stats() or {}
  dev = stats.get("peak_bytes_in_use")
  scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
  return dev, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _gib(n):
  return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


@dataclasses.dataclass
class Engine:
  """A model, its tokenizer and the facts a summary reports. `kind`: "quantized" or "hf"."""
  model: Model
  tokenizer: object
  kind: str
  path: str
  kernel_path: str

  @property
  def config(self):
    return self.model.config

  @functools.cached_property
  def stop_ids(self) -> frozenset[int]:
    """Ids that end a completion: the config's EOS and the tokenizer's EOS / end-of-turn tokens (looked up once)."""
    ids = {self.config.eos_id, getattr(self.tokenizer, "eos_token_id", None)}
    vocab = self.tokenizer.get_vocab()
    ids.update(vocab[t] for t in _STOP_TOKENS if t in vocab)
    return frozenset(i for i in ids if i is not None and i != self.config.mask_id)

  def completion(self, gen_ids) -> list[int]:
    """The generated ids up to (not including) the first stop token."""
    stops = self.stop_ids
    out = []
    for t in np.asarray(gen_ids).tolist():
      if t in stops:
        break
      out.append(int(t))
    return out

  def completion_text(self, gen_ids) -> str:
    return self.tokenizer.decode(self.completion(gen_ids), skip_special_tokens=True)

  def generate(self, prompts: list[list[int]], s, *, seed: int, batch_size: int):
    """Decode every prompt, `batch_size` rows at a time, in order.

    Args:
      prompts: token id lists (ragged lengths are left-padded with the pad id and an attention mask).
      s: sampler settings (`sampling.settings`), of this model's family.
      seed: batch b draws its noise with key fold_in(key(seed), b) (batch 0: exactly that of the sampler called
        with key fold_in(key(seed), 0)).
    Returns:
      ([int32 [gen_length] generated ids per prompt], stats dict: rows, tokens (rows * gen_length), steps
      (denoising steps run), seconds (wall, compilation included), compile_seconds (tracing + compiling in it),
      tokens_per_s (tokens / (seconds - compile_seconds): the decode speed), peak_device_bytes,
      peak_host_bytes, kernel_path).
    """
    if batch_size < 1:
      raise ConfigError(f"batch_size={batch_size}: expected a positive integer")
    for ids in prompts:
      check_context(len(ids), s, self.config)
    root = jax.random.key(seed)
    outs, steps, t0 = [], 0, time.perf_counter()
    with compile_timer() as compile_s:
      for b, start in enumerate(range(0, len(prompts), batch_size)):
        ids, mask = self.pad_batch(prompts[start:start + batch_size])
        x = settings_lib.run_sampler(self.model, ids, s, key=jax.random.fold_in(root, b), attention_mask=mask)
        x = np.asarray(jax.block_until_ready(x))
        outs.extend(x[:, ids.shape[1]:])
        steps += s.steps
    seconds = time.perf_counter() - t0
    compile_seconds = min(compile_s[0], seconds)
    dev, host = memory_peaks()
    tokens = len(prompts) * s.gen_length
    decode = seconds - compile_seconds
    return outs, dict(rows=len(prompts), tokens=tokens, steps=steps, seconds=seconds,
                      compile_seconds=compile_seconds, tokens_per_s=tokens / decode if decode > 0 else float("inf"),
                      peak_device_bytes=dev, peak_host_bytes=host, kernel_path=self.kernel_path)

  def pad_batch(self, rows: list[list[int]]):
    """(int32 [B, P] left-padded ids, int32 [B, P] attention mask or None when all rows have length P)."""
    plen = max(len(r) for r in rows)
    if all(len(r) == plen for r in rows):
      return np.asarray(rows, np.int32), None
    pad = next(i for i in (self.config.pad_id, self.config.eos_id, 0) if i is not None and i != self.config.mask_id)
    ids = np.full((len(rows), plen), pad, np.int32)
    mask = np.zeros((len(rows), plen), np.int32)
    for i, r in enumerate(rows):
      ids[i, plen - len(r):], mask[i, plen - len(r):] = r, 1
    return ids, mask


def summary_line(stats: dict) -> str:
  """One line: tokens, denoising steps, seconds (and the compilation in them), decode tokens/s (compilation
  excluded), peak device and host memory, kernel path."""
  return (f"[summary] rows {stats['rows']}  tokens {stats['tokens']}  denoising steps {stats['steps']}  "
          f"seconds {stats['seconds']:.2f} (compile {stats['compile_seconds']:.2f})  tokens/s "
          f"{stats['tokens_per_s']:.1f} (excl. compile)  peak device memory "
          f"{_gib(stats['peak_device_bytes'])}  peak host memory {_gib(stats['peak_host_bytes'])}  "
          f"kernel path: {stats['kernel_path']}")


def load_engine(path: str, *, dequantize: bool = False, tokenizer=None, verify: bool = True) -> Engine:
  """Load a quantized checkpoint (packed weights kept packed) or an FP HF directory, and its tokenizer.

  The directory kind, config and tokenizer are checked before any weight is read; a read that fails (a
  truncated or partly copied checkpoint) is reported as a CheckpointError naming the fix. tokenizer: one already
  loaded (default: the directory's own, `models.load_tokenizer`). verify: check a quantized checkpoint's
  checksums (`load_quantized`; False skips them, e.g. for one saved without checksums.json)."""
  kind, _ = inspect_model_dir(path)
  tokenizer = load_tokenizer(path) if tokenizer is None else tokenizer
  try:
    model = quantized.load_quantized(path, verify=verify) if kind == "quantized" else load_pretrained(path)
  except QdllmError:
    raise
  except Exception as e:  # noqa: BLE001 (Orbax / safetensors / OS errors of a damaged directory)
    raise CheckpointError(f"{path}: reading the weights failed ({type(e).__name__}: {str(e)[:300]}); the "
                          "checkpoint is truncated or damaged: copy it again, or re-run the launch (it resumes "
                          "and rewrites the checkpoint)") from e
  if dequantize:
    if kind != "quantized":
      raise ConfigError("--dequantize applies to a quantized checkpoint; this is an FP directory")
    model = model.replace_params(dequantize_params(model.params, model.params["embed"].dtype))
  return Engine(model=model, tokenizer=tokenizer, kind=kind, path=os.fspath(path),
                kernel_path=describe_path(model.params, kind, dequantize))

