"""The PTQ study runner: methods x bit widths on one model under one evaluation, as the dLLM PTQ study's tables.

    python -m qdllm_jax.study --config configs/study_tiny.py --workdir runs/study
    python -m qdllm_jax.study --config configs/study_tiny.py --config.eval.limit=50 --config.entries=fp,gptq:w4a16

Each entry is `method:wXaY` (or `fp`): weight-only GPTQ / AWQ / RTN (`aY` = 16) and weight-activation
SmoothQuant / QuaRot / DuQuant, with the settings of the dLLM PTQ study (arXiv 2508.14896, its methods and
experimental setup; FelixMessi/QDLM scripts) taken from the config. All
entries share one calibration set (plain unmasked text, as the study: no [MASK] tokens), one seed and one
evaluation protocol. A W-A entry is a `Model(params, config, act=ActQuant(...))` with its online transforms in
the params, so the same suite (`eval.suite.evaluate`, or lm-eval for real-model protocols) scores every entry.

Per entry the workdir gets `entries/<slug>.json` (metrics, timings, settings, a fingerprint); a rerun skips the
entries whose fingerprint is unchanged, so a killed study resumes. Then `study.json`, `study.md` (the table:
task metrics, their average and the relative drop against FP, as the paper's Tables 1/2) and `study.png`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
import zlib

import jax
import ml_collections as mlc
import numpy as np

from qdllm_jax import cli, config_schema, fileio, run_configs, sharding
from qdllm_jax import config_check as config_lib
from qdllm_jax import report as report_lib
from qdllm_jax import workdir as workdir_lib
from qdllm_jax.baselines.study_registry import REGISTRY, get_study_method
from qdllm_jax.calib.calibration import calibration
from qdllm_jax.errors import ConfigError, QdllmError
from qdllm_jax.eval import paired, protocols, run_eval
from qdllm_jax.key_tree import purpose_key
from qdllm_jax.models import families, hf_checkpoint, hf_tokenizer

log = logging.getLogger("qdllm_jax.study")

FP = "fp"  # the full-precision reference row (every other row is a registered method: baselines/study_registry.py)
_ENTRY = re.compile(r"^(?P<m>[a-z]+)(?::w(?P<w>\d+)a(?P<a>\d+))?$")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One study row: method, weight bits, activation bits (16 = not quantized)."""
  method: str
  w_bits: int = 16
  a_bits: int = 16

  @property
  def slug(self) -> str:
    return FP if self.method == FP else f"{self.method}_w{self.w_bits}a{self.a_bits}"

  @property
  def setting(self) -> str:
    return "FP" if self.method == FP else f"W{self.w_bits}A{self.a_bits}"


def parse_entry(text: str) -> Entry:
  """'gptq:w4a16' -> Entry('gptq', 4, 16); 'fp' -> Entry('fp'). Raises ConfigError naming the fix."""
  m = _ENTRY.match(str(text).strip().lower())
  if not m or (m["m"] != FP and m["m"] not in REGISTRY) or (m["m"] == FP) != (m["w"] is None):
    raise ConfigError(f"study entry {text!r}: expected '{FP}' or '<method>:w<bits>a<bits>' with method one of "
                      f"{sorted(REGISTRY)}, e.g. 'gptq:w4a16' or 'duquant:w4a4'")
  if m["m"] == FP:
    return Entry(FP)
  e = Entry(m["m"], int(m["w"]), int(m["a"]))
  spec = REGISTRY[e.method]
  wa = spec.weight_activation
  if not 2 <= e.w_bits <= 8 or e.a_bits not in range(2, 17) or (not wa and e.a_bits != 16) or (
      wa and e.a_bits == 16 and not spec.allows_a16):
    raise ConfigError(f"study entry {text!r}: weight bits must be 2..8; {e.method} is "
                      + ("weight-activation: activation bits 2..16" if wa else "weight-only: use a16"))
  return e


def defaults() -> mlc.ConfigDict:
  """The study schema's defaults (config_schema.StudySpec: the paper's settings); configs/study_*.py override
  them."""
  return config_schema.defaults(config_schema.StudySpec)


def study_config(**settings) -> mlc.ConfigDict:
  """The study defaults with `settings` ({"section.key": value}) applied: what configs/study_*.py return."""
  return run_configs.apply_settings(defaults(), settings)


def validate(c: mlc.ConfigDict, workdir: str | None = None) -> tuple[dict, list[Entry]]:
  """Check every key and value before heavy work. Returns (plain dict config, entries)."""
  d = config_lib.check_types(c, defaults())  # unknown keys / wrong types -> ConfigError naming the key
  d["workdir"] = workdir or d["workdir"]
  if not d["workdir"]:
    raise ConfigError("no workdir: pass --workdir DIR or set config.workdir")
  config_lib.check_writable_dir(d["workdir"], "workdir")
  if not os.path.isfile(os.path.join(d["model_path"], "config.json")):
    raise ConfigError(f"config.model_path={d['model_path']!r} is not a model directory (no config.json); point it "
                      "at a local Hugging Face checkpoint directory")
  with open(os.path.join(d["model_path"], "config.json"), encoding="utf-8") as f:
    arch = families.family_for_model_type(json.load(f).get("model_type"), d["model_path"]).name
  if arch in protocols.ENCODERS or protocols.get_protocol(d["eval"]["protocol"]).fidelity is not None:
    raise ConfigError(f"config.model_path={d['model_path']!r} is a {arch!r} model under protocol "
                      f"{d['eval']['protocol']!r}: the study scores dLLM task protocols (accuracy, ELBO), not "
                      "encoders. Score an encoder's methods, AWQ included, with benchmarks/bench_minilm_table.py "
                      "(the minilm_fidelity protocol), or point model_path at a LLaDA / Dream checkpoint.")
  entries = [parse_entry(e) for e in d["entries"]]
  if len({e.slug for e in entries}) != len(entries):
    raise ConfigError(f"config.entries repeats an entry: {d['entries']}")
  if not any(e.method == FP for e in entries):
    raise ConfigError(f"config.entries needs '{FP}': relative drops are computed against the FP model")
  if d["dtype"] not in ("float32", "bfloat16"):
    raise ConfigError(f"config.dtype={d['dtype']!r}; expected 'float32' or 'bfloat16'")
  for spec in REGISTRY.values():  # every method's own section, whether or not an entry uses it
    why = spec.check(d)
    if why:
      raise ConfigError(why)
  return d, entries


def build(entry: Entry, model, ids: np.ndarray, d: dict, key):
  """The Model of one entry from the FP model and plain calibration windows ids int32 [N, L] (the registered
  method's build; the FP row is the model itself)."""
  if entry.method == FP:
    return model
  return get_study_method(entry.method).build(model, ids, entry.w_bits, entry.a_bits, d, key)


def _fingerprint(entry: Entry, d: dict, model_digest: str) -> str:
  """Hash of what determines one entry's result: the shared settings and the method's own sections."""
  own = () if entry.method == FP else get_study_method(entry.method).sections
  shared = {k: d[k] for k in ("dtype", "seed", "calib", "eval", *own)}
  blob = json.dumps([dataclasses.asdict(entry), shared, model_digest], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


TASK_METRICS = ("mc_acc/", "gen_em/")  # the accuracy-like metrics averaged into Avg (as the paper's task columns)


def task_columns(metrics: dict) -> list[str]:
  """Per-family accuracy metric names (not the "/all" aggregates), in a stable order."""
  return sorted(k for k in metrics if k.startswith(TASK_METRICS) and not k.endswith("/all"))


def _paired_cells(fp: dict, r: dict) -> list[str]:
  """'delta (t)' of the ELBO (nats/token x 1e3) and of the choice NLL against FP, paired over the same items and
  draws (eval.paired; rows evaluated with one key); '–' for rows without per-item results (older caches)."""
  if r is fp or not (fp.get("paired") and r.get("paired")):
    return ["–", "–"]
  wrap = lambda row: {"protocol": "study", "key_data": row["paired"]["key_data"], "details": row["paired"]}  # noqa
  c = paired.compare(wrap(fp), wrap(r))
  cells = []
  for stat, scale in ((c.get("elbo_nats_per_token"), 1e3), ((c.get("mc_nll") or {}).get("all"), 1.0)):
    cells.append("–" if stat is None else f"{scale * stat['delta']:+.3g} ({stat['t']:+.1f})")
  return cells


def table(rows: list[dict]) -> str:
  """Markdown table: one row per entry, task columns, Avg (mean of the task columns), relative drop vs FP
  ((Avg - Avg_FP) / Avg_FP), the ELBO perplexity with its relative change, and the paired ELBO and choice-NLL
  changes against FP with their t (`_paired_cells`)."""
  fp = next(r for r in rows if r["entry"]["method"] == FP)
  cols = task_columns(fp["metrics"])
  avg = lambda m: float(np.mean([m[c] for c in cols])) if cols else float("nan")  # noqa: E731
  head = ["Method", "Setting"] + [c.replace("mc_acc/", "MC ").replace("gen_em/", "EM ") for c in cols]
  head += ["Avg", "Drop", "ELBO PPL", "PPL change", "ΔELBO x1e3 (t)", "ΔMC NLL (t)"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    m, e = r["metrics"], r["entry"]
    a, ppl = avg(m), m.get("elbo_ppl", float("nan"))
    drop = "–" if e["method"] == FP else f"{100 * (a - avg(fp['metrics'])) / avg(fp['metrics']):+.1f}%"
    fp_ppl = fp["metrics"]["elbo_ppl"]
    dppl = "–" if e["method"] == FP else f"{100 * (ppl - fp_ppl) / fp_ppl:+.2f}%"
    cells = [e["method"] if e["method"] != FP else "–", r["setting"]] + [f"{100 * m[c]:.1f}" for c in cols]
    out.append("| " + " | ".join(cells + [f"{100 * a:.1f}", drop, f"{ppl:.1f}", dppl] + _paired_cells(fp, r)) + " |")
  return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
  """Bar chart of the relative drop of Avg against FP per entry (PNG)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fp = next(r for r in rows if r["entry"]["method"] == FP)
  cols = task_columns(fp["metrics"])
  base = np.mean([fp["metrics"][c] for c in cols])
  rs = [r for r in rows if r is not fp]
  drops = [100 * (np.mean([r["metrics"][c] for c in cols]) - base) / base for r in rs]
  fig, ax = plt.subplots(figsize=(1 + 0.7 * len(rs), 4))
  ax.bar(range(len(rs)), drops, color=["C0" if r["entry"]["a_bits"] == 16 else "C1" for r in rs])
  ax.set_xticks(range(len(rs)))
  ax.set_xticklabels([f"{r['entry']['method']}\n{r['setting']}" for r in rs], fontsize=7)
  ax.axhline(0, color="k", lw=0.8)
  ax.set_ylabel("relative change of task Avg vs FP (%)")
  ax.set_title("PTQ study (blue: weight-only, orange: weight-activation)")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(c: mlc.ConfigDict, workdir: str | None = None) -> dict:
  """Validate, load, calibrate once, then build and evaluate every entry (cached per entry). Returns study.json."""
  d, entries = validate(c, workdir)
  proto = protocols.get_protocol(d["eval"]["protocol"])  # unknown protocol -> ConfigError before loading
  wd = d["workdir"]
  os.makedirs(os.path.join(wd, "entries"), exist_ok=True)
  model = hf_checkpoint.load_pretrained(d["model_path"], d["dtype"])
  tok = hf_tokenizer.load_tokenizer(d["model_path"])
  config_lib.check_tokenizer(tok, model.config, d["model_path"])
  digest = workdir_lib.model_identity(hf_checkpoint.open_checkpoint(d["model_path"]))
  # the run schema's calibration defaults with the study's section over them: plain text (no MCS), on device
  calib = dataclasses.replace(config_schema.CalibSpec(), **d["calib"], mcs=False, offload="device")
  eval_spec = config_schema.build(config_schema.ProtocolSpec, dict(d["eval"], protocol=proto.name))
  _, ids, cinfo = calibration(calib, d["seed"], tok, model.config)
  log.info("calibration: %d plain windows x %d tokens of %s", ids.shape[0], ids.shape[1], calib.source)
  mesh = sharding.make_run_mesh({})
  rows = []
  for i, e in enumerate(entries):
    fp_path, fpr = os.path.join(wd, "entries", e.slug + ".json"), _fingerprint(e, d, digest)
    if os.path.isfile(fp_path):
      with open(fp_path, encoding="utf-8") as f:
        row = json.load(f)
      if row.get("fingerprint") == fpr:
        log.info("[%d/%d] %s %s: cached", i + 1, len(entries), e.method, e.setting)
        rows.append(row)
        continue
    t0 = time.time()
    key = jax.random.fold_in(purpose_key(d["seed"], "baselines"), zlib.crc32(e.slug.encode()) & 0x7FFFFFFF)
    qmodel = build(e, model, ids, d, key)
    jax.block_until_ready(qmodel.params)
    t1 = time.time()
    res = run_eval.evaluate(qmodel, tok, eval_spec, d["seed"], mesh)
    det = res.get("details") or {}  # run_eval.evaluate keeps only paired.DETAIL_KEYS
    row = dict(entry=dataclasses.asdict(e), setting=e.setting, fingerprint=fpr, metrics=res["metrics"],
               quantize_s=round(t1 - t0, 2), eval_s=round(time.time() - t1, 2),
               paired=dict(det, key_data=res["result"].get("key_data"))
               if det else None)
    report_lib.write_json(fp_path, row)
    log.info("[%d/%d] %s %s: quantize %.1fs, eval %.1fs, %s", i + 1, len(entries), e.method, e.setting,
             t1 - t0, time.time() - t1, {k: round(v, 4) for k, v in res["metrics"].items() if k.endswith("/all")})
    rows.append(row)
  out = dict(config=d, calibration=cinfo, protocol=proto.card(), rows=rows, backend=jax.default_backend(),
             jax=jax.__version__)
  report_lib.write_json(os.path.join(wd, "study.json"), out)
  md = (f"# PTQ study: {os.path.basename(os.path.normpath(d['model_path']))}\n\nProtocol `{proto.name}`, seed "
        f"{d['seed']}, calibration {ids.shape[0]} x {ids.shape[1]} plain windows of `{calib.source}`, backend "
        f"{jax.default_backend()}. Task cells in %; Drop = relative change of Avg against FP.\n\n{table(rows)}\n")
  fileio.atomic_write_text(os.path.join(wd, "study.md"), md)
  if d["plots"]:
    plot(rows, os.path.join(wd, "study.png"))
  return out


def main(argv=None) -> int:
  """The CLI (flags as the launch's: --config FILE[:ARG], --workdir, --config.KEY=VALUE or --config.KEY VALUE)."""
  ap = argparse.ArgumentParser(prog="python -m qdllm_jax.study", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", help="a study config file, e.g. configs/study_tiny.py")
  ap.add_argument("--workdir", default=None, help="output directory (replaces config.workdir)")
  ap.add_argument("--log_level", default="INFO", type=str.upper, choices=cli.LOG_LEVELS,
                  help="verbosity of the qdllm_jax log")
  try:
    parsed = cli.parse_command(ap, argv, config_schema.StudySpec, "--config")
    if parsed is None:
      return 0
    a, overrides = parsed
    cli.setup_logging(a.log_level)
    c = cli.load_config(a.config, overrides)
    out = run(c, a.workdir)
  except QdllmError as err:
    print(f"error ({type(err).__name__}): {err}", file=sys.stderr)
    return 2
  print(table(out["rows"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
