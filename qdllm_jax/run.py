"""The run: load -> calibrate (MCS) -> quantize block by block -> save -> evaluate -> report.

`run(spec)` takes a validated `config.RunSpec`. Everything that can be checked from the config, the
checkpoint's headers and its tokenizer is checked before heavy work; the plan (plan.py) is printed and a plan
that does not fit is refused. All randomness comes from one key tree, key(seed) folded with a purpose:
  windows  fold_in(key(seed), 0)                  calibration windows (documents and offsets)
  masks    fold_in(fold_in(key(seed), 1), seed_x)  MCS masks (calib.mcs_mask: sample j uses fold_in(., j))
  eval     fold_in(key(seed), 2)                  the evaluation suite (the same key for FP and quantized)
Workdir outputs: docs/launch.md. A workdir holding another run's fingerprint (workdir.py) is refused unless
overwrite=True; a run killed at any point resumes from the last saved block and writes the same checkpoint bit
for bit. The block loop drives `quant.pipeline.quantize_block` itself (not `quantize_model`) so that the
activations between blocks stay sharded over the data axis and progress is reported per block and matrix;
the state it saves after every block is the pipeline's `PipelineState`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import qdllm_jax
from qdllm_jax import (checkpoint as ckpt_lib, config as config_lib, plan as plan_lib, report as report_lib, sharding,
                       workdir as workdir_lib)
from qdllm_jax.calib import mcs, windows as windows_lib
from qdllm_jax.errors import CheckpointError, ConfigError
from qdllm_jax.eval import paired as paired_lib
from qdllm_jax.models import checkpoint_io, families, hf
from qdllm_jax.quant import pipeline

log = logging.getLogger("qdllm_jax.run")
PURPOSE = {"windows": 0, "masks": 1, "eval": 2, "baselines": 3}  # baselines: rotations of the PTQ study
STEPS = ("load", "calibrate", "quantize", "save", "evaluate", "report")
_DTYPES = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}


def purpose_key(seed: int, purpose: str) -> jax.Array:
  """fold_in(key(seed), PURPOSE[purpose]): the root of one kind of randomness."""
  return jax.random.fold_in(jax.random.key(seed), PURPOSE[purpose])


def _step(i: int, msg: str, *args) -> None:
  log.info(f"[{i + 1}/{len(STEPS)} {STEPS[i]}] " + msg, *args)  # noqa: G004


# ------------------------------------------------------------------------------------------ calibration data
def calibration_texts(calib) -> list[str]:
  """Documents of calib.source: the shipped corpus, C4 / WikiText-2 from the offline HF cache, or local files."""
  from qdllm_jax.data import corpus
  src, field = calib.source, calib.text_field
  if src == "corpus":
    return corpus.load_splits()["train"]
  if src == "c4":
    return windows_lib.load_dataset_texts("allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz",
                                          field=field)
  if src == "wikitext2":  # one document, as GPTQ's loader joins the lines
    return ["\n\n".join(windows_lib.load_dataset_texts("wikitext", name="wikitext-2-raw-v1", field=field))]
  files = [src] if os.path.isfile(src) else sorted(
      os.path.join(src, f) for f in os.listdir(src) if f.endswith(config_lib.CALIB_SUFFIXES))
  if not files:
    raise ConfigError(f"config.calib.source={src!r} holds no {config_lib.CALIB_SUFFIXES} files")
  texts = []
  for f in files:
    if f.endswith(".parquet"):
      texts += windows_lib.load_dataset_texts(f, field=field)
    else:
      texts += windows_lib.read_text_files([f], field=field)
  return texts


def calibration(spec, tok, cfg) -> tuple[np.ndarray, np.ndarray, dict]:
  """(windows int32 [N, L], model inputs int32 [N T, L] (MCS-masked or plain), info).

  Many documents (>= 4 N, e.g. C4): the GPTQ loop, tokenizing only the drawn ones. Few: all are tokenized; windows
  come from documents with >= L tokens, or from their EOS-joined stream when none is that long.
  """
  c = spec.calib
  texts = calibration_texts(c)
  kw = purpose_key(spec.seed, "windows")
  if len(texts) >= 4 * c.nsamples:  # many documents: tokenize only the drawn ones
    win = windows_lib.windows_from_texts(texts, tok, c.nsamples, c.seqlen, kw)
  else:
    docs = windows_lib.tokenize_documents(texts, tok)
    if max(d.shape[0] for d in docs) < c.seqlen:
      docs = windows_lib.docs_to_stream(docs, getattr(tok, "eos_token_id", None))
    win = windows_lib.make_windows(docs, c.nsamples, c.seqlen, kw)
  km = jax.random.fold_in(purpose_key(spec.seed, "masks"), c.seed_x)
  ids, mask, t = mcs.mcs_mask(win, km, cfg.mask_id if cfg.mask_id is not None else -1,
                              mode="mcs" if c.mcs else "plain", prefix_ratio=c.prefix_ratio,
                              timesteps_per_sample=c.timesteps_per_sample)
  info = {"source": c.source, "n_documents": len(texts), "n_windows": int(win.shape[0]), "seqlen": c.seqlen,
          "n_sequences": int(ids.shape[0]), "mcs": c.mcs, "mask_fraction": float(np.mean(np.asarray(mask))),
          "timesteps": np.asarray(t).round(6).tolist()}
  return win, np.asarray(ids, np.int32), info


# ------------------------------------------------------------------------------------------ sharding helpers
def shard_rows(x, mesh):
  """x [N, ...] placed on `mesh` with rows over the data axis (replicated when N does not divide)."""
  sh = sharding.named(mesh, ("batch",) + (None,) * (np.ndim(x) - 1), np.shape(x))
  if isinstance(x, jax.Array):
    return jax.device_put(x, sh)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])


def make_run_mesh(axes: dict):
  """The run's mesh over the first prod(sizes) devices (all of them on multi-host runs)."""
  need = int(np.prod(list(axes.values())))
  devices = jax.devices()
  if need < len(devices) and jax.process_count() == 1:
    log.info("mesh %s uses %d of the %d local devices", axes, need, len(devices))
    devices = devices[:need]
  return sharding.make_mesh(tuple(axes.values()), tuple(axes), devices=devices)


# ------------------------------------------------------------------------------------------ progress
class _MatrixProgress(logging.Handler):
  """Advances a tqdm bar on every per-matrix line that quant.pipeline logs ("block %d %-5s ...")."""

  def __init__(self, bar):
    super().__init__(logging.INFO)
    self.bar = bar

  def emit(self, record):
    if str(record.msg).startswith("block "):
      self.bar.update(1)


@contextlib.contextmanager
def _progress(total: int, initial: int, per_block: int):
  """(blocks bar, matrices bar): tqdm bars with time remaining, shown on a terminal."""
  from tqdm import tqdm
  off = not sys.stderr.isatty()
  outer = tqdm(total=total, initial=initial, desc="blocks", unit="block", disable=off, position=0)
  inner = tqdm(total=per_block, desc="matrices", unit="mat", disable=off, position=1, leave=False)
  handler, plog = _MatrixProgress(inner), logging.getLogger(pipeline.__name__)
  plog.addHandler(handler)
  try:
    yield outer, inner
  finally:
    plog.removeHandler(handler)
    inner.close()
    outer.close()


def quantize_blocks(src, ids, rules_plan, spec, mesh, offload, state, on_block):
  """Quantize blocks state.next_block.. in order; `state = on_block(state)` after each (it saves the state and
  may hand back one whose finished blocks are spilled to disk). Returns the final state."""
  cfg, q = src.config, spec.quant
  groups = pipeline.module_groups(q.module_order, families.family_of(cfg))
  chunk = spec.calib.chunk_size
  place = sharding.host_array if offload else (lambda x: shard_rows(x, mesh))  # noqa: E731
  if state is None:
    x = place(pipeline.embed_inputs(src, ids, offload_activations=True))
    orders = bits = None
    if q.abmp_scope == "global":
      from qdllm_jax.calib import salience
      orders, bits = salience.global_orders(src, x, rules_plan, ratio=q.abmp_ratio or None,
                                            target_bits=q.target_bpw or None, chunk_size=chunk)
    state = pipeline.PipelineState(next_block=0, x=x, blocks=[], report=[], orders=orders, global_bits=bits)
  else:
    state = dataclasses.replace(state, x=place(state.x))
  per_block = sum(rules_plan.rule_for(0, n) is not None for n in families.family_of(cfg).linears)
  # The solvers split each matrix's output rows over the mesh's model axis (quant/row_sharded.py) when it has
  # more than one device; the data axis already splits the calibration activations.
  rows = (mesh, "model") if dict(mesh.shape).get("model", 1) > 1 else None
  chunks = sharding.named(mesh, ("batch", None, None)) if offload and dict(mesh.shape).get("data", 1) > 1 else None
  t_start, done0 = time.perf_counter(), state.next_block
  with _progress(cfg.n_layers, state.next_block, per_block) as (outer, inner):
    for b in range(state.next_block, cfg.n_layers):
      inner.reset()
      t0 = time.perf_counter()
      p = {k: jnp.asarray(v) for k, v in src.block(b).items()}
      qp, out, rep = pipeline.quantize_block(p, state.x, cfg, b, rules_plan, groups=groups, chunk_size=chunk,
                                             orders=state.orders, row_sharding=rows, chunk_sharding=chunks)
      del p
      state = dataclasses.replace(state, next_block=b + 1, x=place(out),
                                  blocks=state.blocks + [sharding.host_tree(qp)], report=state.report + rep)
      state = on_block(state)
      pipeline.release_host_memory()
      outer.update(1)
      dt, n_done = time.perf_counter() - t0, b + 1 - done0
      eta = (time.perf_counter() - t_start) / n_done * (cfg.n_layers - b - 1)
      errs = [e["rel_err"] for e in rep]
      _step(2, "block %d/%d done in %.1fs (mean rel_err %.4f, max %.4f); ETA %s", b + 1, cfg.n_layers, dt,
            float(np.mean(errs)) if errs else 0.0, max(errs, default=0.0), plan_lib._hms(eta))
  return state


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(model, tok, spec, mesh) -> dict:
  """Score `model` under spec.eval.protocol (shipped data: eval.suite; lm-eval tasks: eval.lm_eval_adapter) with
  the eval key of the key tree. Returns {"metrics": flat {name: float}, "result": the full result} (+ "details",
  the per-item results of eval.suite, for the paired comparison)."""
  from qdllm_jax.eval import protocols
  proto = protocols.get_protocol(spec.eval.protocol)
  limit = spec.eval.limit or None
  with jax.set_mesh(mesh):
    if proto.data == "shipped":
      from qdllm_jax.eval import suite
      res = suite.evaluate(model, tok, proto, key=purpose_key(spec.seed, "eval"), limit=limit, return_details=True)
      details = res.pop("details")  # only what the paired comparison reads is kept (and cached for FP)
      return {"metrics": res["metrics"], "result": res,
              "details": {k: details[k] for k in paired_lib.DETAIL_KEYS if k in details}}
    from qdllm_jax.eval import lm_eval_adapter
    res = lm_eval_adapter.run_protocol(model, tok, proto, limit=limit, seed=spec.seed,
                                       ignore_cfg=spec.eval.ignore_cfg, include_path=spec.eval.include_path or None,
                                       task_map=dict(t.split("=", 1) for t in spec.eval.task_map))
  metrics = {f"{task}/{k.split(',')[0]}": float(v) for task, r in res["results"].items()
             for sub in r.values() for k, v in sub.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}
  return {"metrics": metrics, "result": res}


def _fp_model(spec, mesh, dtype):
  model = checkpoint_io.load_pretrained(spec.model_path, dtype)
  return model.replace_params(jax.device_put(model.params, sharding.param_shardings(model.params, mesh)))


def distributed_initialize() -> None:
  """jax.distributed.initialize(): cluster auto-detection on TPU pods, Slurm, Open MPI, ...; elsewhere (e.g. CPU
  hosts) from JAX_COORDINATOR_ADDRESS (read by JAX), JAX_NUM_PROCESSES and JAX_PROCESS_ID. Collectives between
  CPU processes use gloo."""
  kw = {k: int(os.environ[e]) for k, e in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
        if os.environ.get(e)}
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)


def _same_on_every_host(next_block: int, state_dir: str) -> None:
  """ConfigError on every process unless all resume from the same block (multi-host; no-op on one host)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  seen = np.asarray(multihost_utils.process_allgather(np.asarray([next_block], np.int32))).reshape(-1)
  if len(set(seen.tolist())) > 1:
    raise ConfigError(f"the hosts see different saved states in {state_dir} (next blocks {seen.tolist()}); a "
                      "multi-host run resumes only from a workdir on a filesystem every host sees (NFS, GCS "
                      "FUSE): use one, or delete the state to start over")


def _sync(name: str) -> None:
  """A barrier across the processes of a multi-host run (process 0 writes the workdir); no-op on one host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------ the run
def run(spec, *, overwrite: bool = False, kill_after_block: int | None = None, command: str = "") -> dict:
  """Run a validated RunSpec end to end (module docstring); returns the report dict.

  kill_after_block: testing crash recovery: SIGKILL this process right after block k's state is saved.
  Raises QdllmError subclasses (ConfigError, CheckpointError, ...) for problems users can fix, before heavy work
  wherever they can be known then.
  """
  timings, t0 = {}, time.perf_counter()
  if spec.distributed:
    distributed_initialize()
  primary = jax.process_index() == 0
  # 1. load: headers, config checks, tokenizer, plan
  _step(0, "model %s", spec.model_path)
  reader = checkpoint_io.open_checkpoint(spec.model_path)
  cfg = reader.config
  rules_plan = config_lib.check_model(spec, cfg)
  tok = checkpoint_io.load_tokenizer(spec.model_path)
  config_lib.check_tokenizer(tok, cfg, spec.model_path)
  if spec.eval.protocol and _protocol(spec.eval.protocol).data != "shipped":  # the lm-eval protocols
    import importlib.util
    if importlib.util.find_spec("lm_eval") is None:
      raise ConfigError(f"config.eval.protocol={spec.eval.protocol!r} runs lm-eval tasks but lm-eval is not "
                        "installed; `pip install lm-eval`, or skip evaluation with --config.eval.protocol=''")
  stored = _DTYPES[reader.tensors[next(iter(hf.block_names(cfg, 0).values()))][2]]
  dtype = None if spec.dtype == "auto" else spec.dtype
  itemsize = np.dtype(jnp.dtype(dtype or stored)).itemsize
  hw_name, hw = plan_lib.get_hardware(spec)
  rp = plan_lib.make_plan(spec, cfg, rules_plan, itemsize=itemsize, hw_name=hw_name, hw=hw)
  _step(0, "plan:\n%s", rp.text())
  for w in config_lib.ignored_keys(spec):
    log.warning("%s is not used by method %s", w, spec.quant.method)
  if not rp.fits and spec.plan.check:
    raise ConfigError("the run does not fit this machine:\n  " + "\n  ".join(rp.problems) +
                      "\n(--config.plan.check=False runs it anyway)")
  mesh = make_run_mesh(rp.mesh)
  timings["load"] = time.perf_counter() - t0
  # 2. calibrate: windows, MCS masks, fingerprint, workdir
  t = time.perf_counter()
  _step(1, "%d x %d tokens from %r (MCS=%s)", spec.calib.nsamples, spec.calib.seqlen, spec.calib.source,
        spec.calib.mcs)
  _, ids, calib_info = calibration(spec, tok, cfg)
  fp, comps = workdir_lib.fingerprint(spec, reader, ids, rp.mesh)
  wd = spec.workdir
  if primary:
    workdir_lib.prepare(wd, fp, comps, overwrite)
    workdir_lib.clean_stale(wd)  # temporary directories of killed saves (their owner process is gone)
  _sync("workdir")
  _step(1, "fingerprint %s; masked fraction %.3f; workdir %s", fp, calib_info["mask_fraction"], wd)
  timings["calibrate"] = time.perf_counter() - t
  handler = logging.FileHandler(os.path.join(wd, "run.log")) if primary else logging.NullHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s %(message)s"))
  logging.getLogger("qdllm_jax").addHandler(handler)
  try:
    ctx = dict(spec=spec, reader=reader, rules_plan=rules_plan, tok=tok, rp=rp, mesh=mesh, ids=ids, calib_info=calib_info,
               fp=fp, comps=comps, stored=stored, dtype=dtype, timings=timings, t0=t0, primary=primary)
    return _quantize_save_evaluate(ctx, kill_after_block, command)
  finally:
    logging.getLogger("qdllm_jax").removeHandler(handler)
    handler.close()


def _quantize_save_evaluate(ctx: dict, kill_after_block, command) -> dict:
  """Steps 3-6 of `run`; ctx holds what steps 1-2 established (the workdir holds this run's fingerprint)."""
  spec, reader, rules_plan, tok, rp, mesh, ids, calib_info, fp, comps, stored, dtype, timings, t0, primary = (
      ctx[k] for k in ("spec", "reader", "rules_plan", "tok", "rp", "mesh", "ids", "calib_info", "fp", "comps",
                       "stored", "dtype", "timings", "t0", "primary"))
  cfg, wd = reader.config, spec.workdir
  # 3. quantize (resuming from the last saved block)
  t = time.perf_counter()
  ckpt_dir, state_dir = os.path.join(wd, "checkpoint"), os.path.join(wd, "state")
  qrep_path = os.path.join(wd, "quant_report.json")
  done = os.path.isdir(ckpt_dir) and ckpt_lib.read_sidecar(ckpt_dir)[0]["metadata"].get("fingerprint") == fp
  digests, progress = workdir_lib.SourceDigests(wd, reader), workdir_lib.Progress(wd)
  if done and os.path.isfile(qrep_path):
    _step(2, "checkpoint %s of this run is complete; skipping quantization", ckpt_dir)
    _step(2, "source check: %s", digests.recheck())  # a changed model is refused, naming the tensor
    progress.start(None, True, timings)
    with open(qrep_path, encoding="utf-8") as f:
      layers = json.load(f)["layers"]
  else:
    state = ckpt_lib.load_state(state_dir, fp, lazy=True)
    _same_on_every_host(0 if state is None else state.next_block, state_dir)
    if state is not None:
      _step(2, "resuming after block %d of %d (state in %s)", state.next_block, cfg.n_layers, state_dir)
      _step(2, "source check: %s", digests.recheck())
    progress.start(None if state is None else state.next_block, False, timings)
    t_block = [time.perf_counter()]

    def on_block(s):  # the finished blocks wait on disk, not in host memory (checkpoint/state.py)
      if primary:  # the digests of the tensors read so far first: a resume from this state checks against them
        digests.save()
        progress.block(s.next_block - 1, time.perf_counter() - t_block[0])
      t_block[0] = time.perf_counter()
      multi = jax.process_count() > 1
      x = sharding.host_array(s.x) if multi else s.x  # a collective on multi-host runs: every process calls it
      if primary:
        ckpt_lib.save_state(state_dir, dataclasses.replace(s, x=x), fingerprint=fp)
      _sync(f"state {s.next_block}")
      if kill_after_block is not None and s.next_block == kill_after_block:
        os.kill(os.getpid(), signal.SIGKILL)
      if not primary:  # only process 0 saves the checkpoint; the others drop their copies of the blocks
        return dataclasses.replace(s, blocks=[None] * len(s.blocks))
      return ckpt_lib.spill(state_dir, s, fingerprint=fp)

    src = workdir_lib.checked_source(reader, dtype, digests)  # every tensor read is digested and checked
    state = quantize_blocks(src, ids, rules_plan, spec, mesh, rp.offload, state, on_block)
    layers = state.report
    timings["quantize"] = time.perf_counter() - t
    # 4. save
    t = time.perf_counter()
    # streamed: save_quantized reads each top tensor and spilled block only while it writes that part
    params = dict(src.lazy_top(), blocks=list(state.blocks))
    meta = {"fingerprint": fp, "config": spec.semantic_dict(), "rules": json.loads(rules_plan.to_json()),
            "qdllm_jax_version": qdllm_jax.__version__, "calibration": {k: v for k, v in calib_info.items()
                                                                       if k != "timesteps"}}
    if primary:
      ckpt_lib.save_quantized(ckpt_dir, params, cfg, metadata=meta, tokenizer_from=spec.model_path, overwrite=True)
      digests.save()
      report_lib.write_json(qrep_path, {"fingerprint": fp, "layers": layers})
      shutil.rmtree(state_dir, ignore_errors=True)
      if spec.save.export_hf:
        ckpt_lib.export_hf(ckpt_dir, os.path.join(wd, "hf"), dtype=stored, overwrite=True)
    _sync("checkpoint")
    _step(3, "saved %s", ckpt_dir)
    timings["save"] = time.perf_counter() - t
  if primary:
    progress.save()
  try:  # checks every checksum of the checkpoint (workdir.content_digest)
    ck_sizes = workdir_lib.checkpoint_sizes(ckpt_dir)
  except CheckpointError as e:
    raise CheckpointError(f"{e}. In this workdir: rerun the same command with --overwrite to quantize and save "
                          "again") from e
  sizes = dict(ck_sizes, fp_model_bytes=sum(
      os.path.getsize(os.path.join(reader.path, f)) for f in {f for f, _, _ in reader.tensors.values()}))
  _step(3, "%.3f bits/weight in the quantized linears, %.3f overall; %.2f MiB (FP %.2f MiB)",
        sizes["true_bits_per_weight"], sizes["model_bits_per_weight"], sizes["checkpoint_nbytes"] / 2 ** 20,
        sizes["fp_model_bytes"] / 2 ** 20)
  # 5. evaluate
  t = time.perf_counter()
  results, card = {"fp": None, "quantized": None}, None
  if spec.eval.protocol:
    from qdllm_jax.eval import protocols
    card = protocols.get_protocol(spec.eval.protocol).card()
    if card["fidelity"] is not None:  # an encoder: FP and quantized are scored together
      results = _encoder_fidelity(spec, mesh, dtype, tok, ckpt_dir, cfg.mask_id)
    elif spec.eval.fp:
      results["fp"] = _cached_fp_eval(spec, wd, comps["model"], lambda: evaluate(
          _fp_model(spec, mesh, dtype), tok, spec, mesh), primary)
    if spec.eval.quantized and card["fidelity"] is None:
      results["quantized"] = evaluate(ckpt_lib.load_quantized(ckpt_dir, mesh=mesh), tok, spec, mesh)
    for k in [k for k, v in results.items() if v is not None]:
      _step(4, "%s: %s", k, results[k]["metrics"])
  metrics = {k: None if v is None else v["metrics"] for k, v in results.items()}
  comparison = _paired_comparison(results)
  if comparison:
    _step(4, "quantized - FP, paired over the same items: %s", ", ".join(
        f"{k} {v['delta']:+.4g} (t {v['t']:.1f})" for k, v in paired_lib.flatten(comparison)
        if k.endswith("all") or "/" not in k or k == "rel_err/plain"))
  timings["evaluate"] = time.perf_counter() - t
  timings["total"] = time.perf_counter() - t0
  if primary:
    progress.save()
  history = progress.summary()  # every attempt in this workdir: a resumed report keeps the earlier steps' times
  # 6. report
  report = {
      "qdllm_jax_version": qdllm_jax.__version__, "command": command, "fingerprint": fp,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": spec.to_dict(),
      "model": {"path": os.path.abspath(spec.model_path), "arch": cfg.arch, "n_layers": cfg.n_layers,
                "d_model": cfg.d_model, "mlp_hidden": cfg.mlp_hidden, "vocab_size": cfg.vocab_size,
                "num_params": families.num_params(cfg), "stored_dtype": stored,
                "source_sha256": digests.summary(), "source_tensors_digested": len(digests.tensors)},
      "plan": rp.to_dict(), "mesh": rp.mesh, "devices": f"{len(mesh.devices.flat)} x {jax.devices()[0].device_kind}",
      "calibration": calib_info, "rules": json.loads(rules_plan.to_json()), "layers": layers, "sizes": sizes,
      "timings_s": history.pop("timings_s"), "timings_this_run_s": timings, "resume": history, "metrics": metrics,
      "protocol": card, "comparison": comparison,
      "evaluation": {k: (None if v is None else v["result"]) for k, v in results.items()}}
  if primary:
    report = report_lib.write_report(wd, report, plots=spec.report.plots)
    _step(5, "wrote %s (report.json, report.md, %d plots) in %.1fs total", wd, len(report["plots"]),
          timings["total"])
  return report


def _protocol(name: str):
  from qdllm_jax.eval import protocols
  return protocols.get_protocol(name)


def _encoder_fidelity(spec, mesh, dtype, tok, ckpt_dir, mask_id) -> dict:
  """An encoder protocol: the FP and the quantized encoder scored together on the same sentences and masks
  (eval.fidelity.evaluate_fidelity, inputs seeded by spec.seed); "fp" carries the identity metrics (error 0,
  cosine and correlations 1), "quantized" the candidate's and the paired comparison."""
  from qdllm_jax.eval import fidelity
  proto = _protocol(spec.eval.protocol)
  with jax.set_mesh(mesh):
    res = fidelity.evaluate_fidelity(
        fidelity.model_states_fn(_fp_model(spec, mesh, dtype)),
        fidelity.model_states_fn(ckpt_lib.load_quantized(ckpt_dir, mesh=mesh)), tok, proto.fidelity,
        seed=spec.seed, mask_id=mask_id)
  return {"fp": {"metrics": res["metrics"]["fp"], "result": None},
          "quantized": {"metrics": res["metrics"]["quantized"], "result": res, "comparison": res["comparison"]}}


def _paired_comparison(results: dict):
  """The encoder protocols' own comparison; eval.paired.compare(FP, quantized) when both were scored by eval.suite
  (same protocol and key); else None."""
  fp, q = results.get("fp"), results.get("quantized")
  if q and q.get("comparison"):
    return q["comparison"]
  if not (fp and q and fp.get("details") and q.get("details")):
    return None
  return paired_lib.compare(dict(fp["result"], details=fp["details"]), dict(q["result"], details=q["details"]))


def _cached_fp_eval(spec, wd, model_hash, compute, primary) -> dict:
  """The FP model's evaluation, computed once per (model, protocol, limit, seed) and kept in eval_fp.json."""
  key = {"model": model_hash, "protocol": spec.eval.protocol, "limit": spec.eval.limit,
         "ignore_cfg": spec.eval.ignore_cfg, "seed": spec.seed,
         "dtype": spec.dtype, "details": 1}  # details: per-item results are cached too (for the comparison)
  path = os.path.join(wd, "eval_fp.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      cached = json.load(f)
    if cached.get("key") == key:
      _step(4, "FP metrics from %s", path)
      return cached["value"]
  value = json.loads(json.dumps(compute(), default=report_lib._json_default))
  if primary:
    report_lib.write_json(path, {"key": key, "value": value})
  return value
