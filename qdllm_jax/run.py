"""The run: prepare -> calibrate (MCS) -> quantize block by block -> save -> evaluate -> report.

`run(spec)` takes a validated `config.RunSpec` and calls one function per step; each step lives where its work
belongs (calib/calibration.py, quant/pipeline.py, checkpoint/, eval/run_eval.py, report.py) and what one step
hands the next is a small frozen dataclass (`Prepared`, `Calibrated`, `Quantized`). Everything that can be checked
from the config, the checkpoint's headers and its tokenizer is checked before heavy work; the plan (plan.py) is
printed and a plan that does not fit is refused. All randomness comes from one key tree (key_tree.py).
Workdir outputs: docs/launch.md. A workdir holding another run's fingerprint (workdir.py) is refused unless
overwrite=True; a run killed at any point resumes from the last saved block with the same array contents and
`checkpoint_sha256` (docs/launch.md). The blocks go through the package's one block loop,
`quant.pipeline.quantize_model`, with this run's hooks: activations sharded over the data axis between blocks,
the state saved and the finished blocks spilled to disk after each block, hosts synchronised, progress shown.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

import qdllm_jax
from qdllm_jax import checkpoint as ckpt_lib
from qdllm_jax import config_check as config_lib
from qdllm_jax import hardware, multihost, sharding
from qdllm_jax import plan as plan_lib
from qdllm_jax import report as report_lib
from qdllm_jax import workdir as workdir_lib
from qdllm_jax.calib.calibration import calibration
from qdllm_jax.errors import CheckpointError, ConfigError
from qdllm_jax.eval import paired as paired_lib
from qdllm_jax.eval import protocols, run_eval
from qdllm_jax.models import families, hf, hf_checkpoint, hf_tokenizer
from qdllm_jax.progress import block_progress
from qdllm_jax.quant import pipeline

log = logging.getLogger("qdllm_jax.run")
STEPS = ("load", "calibrate", "quantize", "save", "evaluate", "report")
_DTYPES = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}


def _step(i: int, msg: str, *args) -> None:
  log.info(f"[{i + 1}/{len(STEPS)} {STEPS[i]}] " + msg, *args)  # noqa: G004


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What step 1 established: the source, its checks, the tokenizer, the plan and the mesh."""
  reader: object
  rules_plan: object
  tok: object
  plan: object
  mesh: object
  stored: str       # the checkpoint's stored dtype
  dtype: str | None  # the dtype params are cast to (None: as stored)
  primary: bool     # process 0 (the one that writes the workdir)


@dataclasses.dataclass(frozen=True)
class Calibrated:
  """What step 2 established: the calibration inputs and the workdir's fingerprint."""
  ids: np.ndarray
  info: dict
  fingerprint: str
  components: dict


@dataclasses.dataclass(frozen=True)
class Quantized:
  """What steps 3-4 established: the saved checkpoint, its per-matrix report and the source digests."""
  ckpt_dir: str
  layers: list
  digests: object
  progress: object


def prepare(spec) -> Prepared:
  """Step 1: headers, config checks, tokenizer, plan (refused if it does not fit), mesh."""
  if spec.distributed:
    multihost.distributed_initialize()
  _step(0, "model %s", spec.model_path)
  reader = hf_checkpoint.open_checkpoint(spec.model_path)
  cfg = reader.config
  rules_plan = config_lib.check_model(spec, cfg)
  tok = hf_tokenizer.load_tokenizer(spec.model_path)
  config_lib.check_tokenizer(tok, cfg, spec.model_path)
  if spec.eval.protocol and protocols.get_protocol(spec.eval.protocol).data != "shipped":  # lm-eval protocols
    if importlib.util.find_spec("lm_eval") is None:
      raise ConfigError(f"config.eval.protocol={spec.eval.protocol!r} runs lm-eval tasks but lm-eval is not "
                        "installed; `pip install lm-eval`, or skip evaluation with --config.eval.protocol=''")
  stored = _DTYPES[reader.tensors[next(iter(hf.block_names(cfg, 0).values()))][2]]
  dtype = None if spec.dtype == "auto" else spec.dtype
  itemsize = np.dtype(jnp.dtype(dtype or stored)).itemsize
  hw_name, hw = hardware.get_hardware(spec)
  rp = plan_lib.make_plan(spec, cfg, rules_plan, itemsize=itemsize, hw_name=hw_name, hw=hw)
  _step(0, "plan:\n%s", rp.text())
  for w in config_lib.ignored_keys(spec):
    log.warning("%s is not used by method %s", w, spec.quant.method)
  if not rp.fits and spec.plan.check:
    raise ConfigError("the run does not fit this machine:\n  " + "\n  ".join(rp.problems) +
                      "\n(--config.plan.check=False runs it anyway)")
  return Prepared(reader=reader, rules_plan=rules_plan, tok=tok, plan=rp, mesh=sharding.make_run_mesh(rp.mesh),
                  stored=stored, dtype=dtype, primary=jax.process_index() == 0)


def calibrate(spec, prep: Prepared, overwrite: bool) -> Calibrated:
  """Step 2: windows and MCS masks, the fingerprint, and the workdir (refused if it holds another run)."""
  _step(1, "%d x %d tokens from %r (MCS=%s)", spec.calib.nsamples, spec.calib.seqlen, spec.calib.source,
        spec.calib.mcs)
  _, ids, info = calibration(spec.calib, spec.seed, prep.tok, prep.reader.config)
  fp, comps = workdir_lib.fingerprint(spec, prep.reader, ids, prep.plan.mesh)
  if prep.primary:
    workdir_lib.prepare(spec.workdir, fp, comps, overwrite)
    workdir_lib.clean_stale(spec.workdir)  # temporary directories of killed saves (their owner process is gone)
  multihost.sync("workdir")
  _step(1, "fingerprint %s; masked fraction %.3f; workdir %s", fp, info["mask_fraction"], spec.workdir)
  return Calibrated(ids=ids, info=info, fingerprint=fp, components=comps)


def _run_hooks(spec, prep: Prepared, cal: Calibrated, state_dir, digests, progress, bars, kill_after_block):
  """The block loop's hooks for this run: placement, progress, save + spill + sync after every block."""
  cfg, mesh = prep.reader.config, prep.mesh
  t_block, t_start = [time.perf_counter()], time.perf_counter()
  done0 = [None]

  def on_block(s, rep):
    if done0[0] is None:
      done0[0] = s.next_block - 1
    dt = time.perf_counter() - t_block[0]
    if prep.primary:  # the digests of the tensors read so far first: a resume from this state checks against them
      digests.save()
      progress.block(s.next_block - 1, dt)
    x = sharding.host_array(s.x) if jax.process_count() > 1 else s.x  # a collective on multi-host runs
    if prep.primary:
      ckpt_lib.save_state(state_dir, dataclasses.replace(s, x=x), fingerprint=cal.fingerprint)
    multihost.sync(f"state {s.next_block}")
    if kill_after_block is not None and s.next_block == kill_after_block:
      os.kill(os.getpid(), signal.SIGKILL)
    bars.block()
    errs = [e["rel_err"] for e in rep]
    eta = (time.perf_counter() - t_start) / (s.next_block - done0[0]) * (cfg.n_layers - s.next_block)
    _step(2, "block %d/%d done in %.1fs (mean rel_err %.4f, max %.4f); ETA %s", s.next_block, cfg.n_layers, dt,
          float(np.mean(errs)) if errs else 0.0, max(errs, default=0.0), plan_lib.format_hms(eta))
    t_block[0] = time.perf_counter()
    if not prep.primary:  # only process 0 saves the checkpoint; the others drop their copies of the blocks
      return dataclasses.replace(s, blocks=[None] * len(s.blocks))
    return ckpt_lib.spill(state_dir, s, fingerprint=cal.fingerprint)  # finished blocks wait on disk

  offload = prep.plan.offload
  place = sharding.host_array if offload else (lambda x: sharding.shard_rows(x, mesh))
  return pipeline.BlockHooks(place=place, on_matrix=bars.matrix, on_block=on_block)


def quantize_and_save(spec, prep: Prepared, cal: Calibrated, timings: dict, kill_after_block) -> Quantized:
  """Steps 3-4: the blocks through `pipeline.quantize_model` (resuming from the last saved block), then the
  checkpoint written part by part; a complete checkpoint of this run is reused after re-checking the source."""
  cfg, wd, fp, q = prep.reader.config, spec.workdir, cal.fingerprint, spec.quant
  t = time.perf_counter()
  ckpt_dir, state_dir = os.path.join(wd, "checkpoint"), os.path.join(wd, "state")
  qrep_path = os.path.join(wd, "quant_report.json")
  done = os.path.isdir(ckpt_dir) and ckpt_lib.read_sidecar(ckpt_dir)[0]["metadata"].get("fingerprint") == fp
  digests, progress = workdir_lib.SourceDigests(wd, prep.reader), workdir_lib.Progress(wd, writer=prep.primary)
  if done and os.path.isfile(qrep_path):
    _step(2, "checkpoint %s of this run is complete; skipping quantization", ckpt_dir)
    _step(2, "source check: %s", digests.recheck())  # a changed model is refused, naming the tensor
    progress.start(None, True, timings)
    with open(qrep_path, encoding="utf-8") as f:
      return Quantized(ckpt_dir=ckpt_dir, layers=json.load(f)["layers"], digests=digests, progress=progress)
  state = ckpt_lib.load_state(state_dir, fp, lazy=True)
  multihost.same_on_every_host(0 if state is None else state.next_block, state_dir)
  if state is not None:
    _step(2, "resuming after block %d of %d (state in %s)", state.next_block, cfg.n_layers, state_dir)
    _step(2, "source check: %s", digests.recheck())
  progress.start(None if state is None else state.next_block, False, timings)
  src = workdir_lib.checked_source(prep.reader, prep.dtype, digests)  # every tensor read is digested and checked
  family = families.family_of(cfg)
  per_block = sum(prep.rules_plan.rule_for(0, n) is not None for n in family.linears)
  mesh = prep.mesh
  # the solvers split each matrix's output rows over the model axis (quant/row_sharded.py) when it has more than
  # one device; the data axis splits the calibration activations (host chunks placed row-sharded when offloaded)
  rows = (mesh, "model") if dict(mesh.shape).get("model", 1) > 1 else None
  chunks = (sharding.named(mesh, ("batch", None, None)) if prep.plan.offload and dict(mesh.shape).get("data", 1) > 1
            else None)
  global_abmp = ({"ratio": q.abmp_ratio or None, "target_bits": q.target_bpw or None}
                 if q.abmp_scope == "global" else None)
  with block_progress(cfg.n_layers, 0 if state is None else state.next_block, per_block) as bars:
    hooks = _run_hooks(spec, prep, cal, state_dir, digests, progress, bars, kill_after_block)
    params, layers = pipeline.quantize_model(
        src, cal.ids, prep.rules_plan, module_order=q.module_order, chunk_size=spec.calib.chunk_size,
        global_abmp=global_abmp, resume=state, row_sharding=rows, chunk_sharding=chunks, hooks=hooks)
  timings["quantize"] = time.perf_counter() - t
  t = time.perf_counter()
  meta = {"fingerprint": fp, "config": spec.semantic_dict(), "rules": json.loads(prep.rules_plan.to_json()),
          "qdllm_jax_version": qdllm_jax.__version__,
          "calibration": {k: v for k, v in cal.info.items() if k != "timesteps"}}
  if prep.primary:  # streamed: save_quantized reads each top tensor and spilled block only while it writes it
    ckpt_lib.save_quantized(ckpt_dir, params, cfg, metadata=meta, tokenizer_from=spec.model_path, overwrite=True)
    digests.save()
    report_lib.write_json(qrep_path, {"fingerprint": fp, "layers": layers})
    shutil.rmtree(state_dir, ignore_errors=True)
    if spec.save.export_hf:
      ckpt_lib.export_hf(ckpt_dir, os.path.join(wd, "hf"), dtype=prep.stored, overwrite=True)
  multihost.sync("checkpoint")
  _step(3, "saved %s", ckpt_dir)
  timings["save"] = time.perf_counter() - t
  return Quantized(ckpt_dir=ckpt_dir, layers=layers, digests=digests, progress=progress)


def checkpoint_sizes(prep: Prepared, ckpt_dir: str) -> dict:
  """Sizes of the saved checkpoint (every checksum checked) beside the FP model's files."""
  try:
    ck = workdir_lib.checkpoint_sizes(ckpt_dir)
  except CheckpointError as e:
    raise CheckpointError(f"{e}. In this workdir: rerun the same command with --overwrite to quantize and save "
                          "again") from e
  reader = prep.reader
  sizes = dict(ck, fp_model_bytes=sum(os.path.getsize(os.path.join(reader.path, f))
                                      for f in {f for f, _, _ in reader.tensors.values()}))
  _step(3, "%.3f bits/weight in the quantized linears, %.3f overall; %.2f MiB (FP %.2f MiB)",
        sizes["true_bits_per_weight"], sizes["model_bits_per_weight"], sizes["checkpoint_nbytes"] / 2 ** 20,
        sizes["fp_model_bytes"] / 2 ** 20)
  return sizes


def evaluate(spec, prep: Prepared, cal: Calibrated, ckpt_dir: str) -> tuple[dict, dict | None, dict | None]:
  """Step 5: (results {"fp", "quantized"}, the protocol card, the paired comparison quantized - FP)."""
  results, card = {"fp": None, "quantized": None}, None
  if not spec.eval.protocol:
    return results, card, None
  mesh, cfg = prep.mesh, prep.reader.config
  card = protocols.get_protocol(spec.eval.protocol).card()
  if card["fidelity"] is not None:  # an encoder: FP and quantized are scored together
    results = run_eval.encoder_fidelity(spec, mesh, prep.dtype, prep.tok, ckpt_dir, cfg.mask_id)
  else:
    if spec.eval.fp:
      results["fp"] = run_eval.cached_fp_eval(spec, spec.workdir, cal.components["model"], lambda: run_eval.evaluate(
          run_eval.fp_model(spec.model_path, mesh, prep.dtype), prep.tok, spec.eval, spec.seed, mesh), prep.primary)
    if spec.eval.quantized:
      results["quantized"] = run_eval.evaluate(ckpt_lib.load_quantized(ckpt_dir, mesh=mesh), prep.tok, spec.eval,
                                               spec.seed, mesh)
  for k in [k for k, v in results.items() if v is not None]:
    _step(4, "%s: %s", k, results[k]["metrics"])
  comparison = run_eval.paired_comparison(results)
  if comparison:
    _step(4, "quantized - FP, paired over the same items: %s", ", ".join(
        f"{k} {v['delta']:+.4g} (t {v['t']:.1f})" for k, v in paired_lib.flatten(comparison)
        if k.endswith("all") or "/" not in k or k == "rel_err/plain"))
  return results, card, comparison


def build_report(spec, prep, cal, qz, sizes, evaluated, timings, history, command) -> dict:
  """Step 6: the report dict (report.py writes report.json / report.md / plots)."""
  results, card, comparison = evaluated
  cfg = prep.reader.config
  return {
      "qdllm_jax_version": qdllm_jax.__version__, "command": command, "fingerprint": cal.fingerprint,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": spec.to_dict(),
      "model": {"path": os.path.abspath(spec.model_path), "arch": cfg.arch, "n_layers": cfg.n_layers,
                "d_model": cfg.d_model, "mlp_hidden": cfg.mlp_hidden, "vocab_size": cfg.vocab_size,
                "num_params": families.num_params(cfg), "stored_dtype": prep.stored,
                "source_sha256": qz.digests.summary(), "source_tensors_digested": len(qz.digests.tensors)},
      "plan": prep.plan.to_dict(), "mesh": prep.plan.mesh,
      "devices": f"{len(prep.mesh.devices.flat)} x {jax.devices()[0].device_kind}",
      "calibration": cal.info, "rules": json.loads(prep.rules_plan.to_json()), "layers": qz.layers, "sizes": sizes,
      "timings_s": history.pop("timings_s"), "timings_this_run_s": timings, "resume": history,
      "metrics": {k: None if v is None else v["metrics"] for k, v in results.items()},
      "protocol": card, "comparison": comparison,
      "evaluation": {k: (None if v is None else v["result"]) for k, v in results.items()}}


def run(spec, *, overwrite: bool = False, kill_after_block: int | None = None, command: str = "") -> dict:
  """Run a validated RunSpec end to end (module docstring); returns the report dict.

  kill_after_block: testing crash recovery: SIGKILL this process right after block k's state is saved.
  Raises QdllmError subclasses (ConfigError, CheckpointError, ...) for problems users can fix, before heavy work
  wherever they can be known then.
  """
  timings, t0 = {}, time.perf_counter()
  prep = prepare(spec)
  timings["load"] = time.perf_counter() - t0
  t = time.perf_counter()
  cal = calibrate(spec, prep, overwrite)
  timings["calibrate"] = time.perf_counter() - t
  handler = logging.FileHandler(os.path.join(spec.workdir, "run.log")) if prep.primary else logging.NullHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s %(message)s"))
  logging.getLogger("qdllm_jax").addHandler(handler)
  try:
    qz = quantize_and_save(spec, prep, cal, timings, kill_after_block)
    if prep.primary:
      qz.progress.save()
    sizes = checkpoint_sizes(prep, qz.ckpt_dir)
    t = time.perf_counter()
    evaluated = evaluate(spec, prep, cal, qz.ckpt_dir)
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    if prep.primary:
      qz.progress.save()
    history = qz.progress.summary()  # every attempt in this workdir: a resumed report keeps earlier steps' times
    report = build_report(spec, prep, cal, qz, sizes, evaluated, timings, history, command)
    if prep.primary:
      report = report_lib.write_report(spec.workdir, report, plots=spec.report.plots)
      _step(5, "wrote %s (report.json, report.md, %d plots) in %.1fs total", spec.workdir, len(report["plots"]),
            timings["total"])
    return report
  finally:
    logging.getLogger("qdllm_jax").removeHandler(handler)
    handler.close()
