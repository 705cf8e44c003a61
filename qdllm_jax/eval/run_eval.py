"""The launch's evaluation step: one model under a protocol (shipped data or lm-eval tasks), an encoder's
fidelity against its FP model, the paired comparison quantized - FP, and the cached FP evaluation of a workdir."""
from __future__ import annotations

import json
import logging
import os

import jax

from qdllm_jax import report as report_lib
from qdllm_jax import sharding
from qdllm_jax.checkpoint import load_quantized
from qdllm_jax.eval import fidelity, protocols, suite
from qdllm_jax.eval import paired as paired_lib
from qdllm_jax.key_tree import purpose_key
from qdllm_jax.models import families, hf_checkpoint

log = logging.getLogger("qdllm_jax.run")


def evaluate(model, tok, e, seed: int, mesh) -> dict:
  """Score `model` under the evaluation settings `e` (config_schema.EvalSpec or ProtocolSpec: protocol, limit,
  ignore_cfg, include_path, task_map): shipped data through eval.suite, lm-eval tasks through
  eval.lm_eval_adapter, with the eval key of the key tree (key_tree.py). Returns {"metrics": flat
  {name: float}, "result": the full result} (+ "details", the per-item results of eval.suite, for the paired
  comparison)."""
  proto = protocols.get_protocol(e.protocol)
  limit = e.limit or None
  with jax.set_mesh(mesh):
    if proto.data == "shipped":
      res = suite.evaluate(model, tok, proto, key=purpose_key(seed, "eval"), limit=limit, return_details=True)
      details = res.pop("details")  # only what the paired comparison reads is kept (and cached for FP)
      return {"metrics": res["metrics"], "result": res,
              "details": {k: details[k] for k in paired_lib.DETAIL_KEYS if k in details}}
    from qdllm_jax.eval import lm_eval_adapter  # lm-eval is an optional dependency
    res = lm_eval_adapter.run_protocol(model, tok, proto, limit=limit, seed=seed, ignore_cfg=e.ignore_cfg,
                                       include_path=e.include_path or None,
                                       task_map=dict(t.split("=", 1) for t in e.task_map))
  metrics = {f"{task}/{k.split(',')[0]}": float(v) for task, r in res["results"].items()
             for sub in r.values() for k, v in sub.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}
  return {"metrics": metrics, "result": res}


def fp_model(model_path: str, mesh, dtype):
  """The FP model of `model_path` (cast to dtype unless None), its params placed on `mesh` by the axis rules."""
  model = hf_checkpoint.load_pretrained(model_path, dtype)
  axes = families.family_of(model.config).param_axes
  return model.replace_params(jax.device_put(model.params, sharding.param_shardings(model.params, mesh, axes)))




def encoder_fidelity(spec, mesh, dtype, tok, ckpt_dir, mask_id) -> dict:
  """An encoder protocol: the FP and the quantized encoder scored together on the same sentences and masks
  (eval.fidelity.evaluate_fidelity, inputs seeded by spec.seed); "fp" carries the identity metrics (error 0,
  cosine and correlations 1), "quantized" the candidate's and the paired comparison."""
  proto = protocols.get_protocol(spec.eval.protocol)
  with jax.set_mesh(mesh):
    res = fidelity.evaluate_fidelity(
        fidelity.model_states_fn(fp_model(spec.model_path, mesh, dtype)),
        fidelity.model_states_fn(load_quantized(ckpt_dir, mesh=mesh)), tok, proto.fidelity,
        seed=spec.seed, mask_id=mask_id)
  return {"fp": {"metrics": res["metrics"]["fp"], "result": None},
          "quantized": {"metrics": res["metrics"]["quantized"], "result": res, "comparison": res["comparison"]}}


def paired_comparison(results: dict):
  """The encoder protocols' own comparison; eval.paired.compare(FP, quantized) when both were scored by eval.suite
  (same protocol and key); else None."""
  fp, q = results.get("fp"), results.get("quantized")
  if q and q.get("comparison"):
    return q["comparison"]
  if not (fp and q and fp.get("details") and q.get("details")):
    return None
  return paired_lib.compare(dict(fp["result"], details=fp["details"]), dict(q["result"], details=q["details"]))


def cached_fp_eval(spec, wd, model_hash, compute, primary) -> dict:
  """The FP model's evaluation, computed once per (model, protocol, limit, seed) and kept in eval_fp.json."""
  key = {"model": model_hash, "protocol": spec.eval.protocol, "limit": spec.eval.limit,
         "ignore_cfg": spec.eval.ignore_cfg, "seed": spec.seed,
         "dtype": spec.dtype, "details": 1}  # details: per-item results are cached too (for the comparison)
  path = os.path.join(wd, "eval_fp.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      cached = json.load(f)
    if cached.get("key") == key:
      log.info("FP metrics from %s", path)
      return cached["value"]
  value = json.loads(json.dumps(compute(), default=report_lib.json_default))
  if primary:
    report_lib.write_json(path, {"key": key, "value": value})
  return value
