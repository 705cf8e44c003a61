"""The run report: `report.json` (the schema below, one place), `report.md` and PNG plots (matplotlib, Agg).

report.json keys:
  qdllm_jax_version, command, created (UTC ISO time), fingerprint      identity of the run
  config          the validated RunSpec as a dict                      model   arch and widths, num_params
  plan            plan.RunPlan.to_dict() (memory, mesh, estimate)      mesh    {axis: size}, devices
  calibration     source, windows, seqlen, sequences, mask fraction    rules   {"table", "modules": {path: rule}}
  layers          one entry per quantized matrix (quant.pipeline report: layer, name, module, method, bits,
                  group_size, rel_err = ||(W - W^) X|| / ||W X||, loss, layer_loss, orders, bits_per_weight, time_s)
  sizes           checkpoint.size_summary + checkpoint_nbytes, disk_bytes, fp_model_bytes, checkpoint_sha256
  timings_s       seconds per step, over every attempt in the workdir  metrics {"fp", "quantized"}: flat {name: value}
  protocol        the protocol card (every evaluation setting)         evaluation  {"fp", "quantized"}: full results
  timings_this_run_s  this attempt's steps                             resume  workdir.Progress.summary(): resumed?,
                  from which block, attempts (each with its step timings), block_s (wall seconds per block)
"""
from __future__ import annotations

import json
import os

import numpy as np

from qdllm_jax import fileio
from qdllm_jax.eval import paired as paired_lib
from qdllm_jax.models.families import get_family

PLOTS = {"layer_errors": "plots/layer_errors.png", "abmp_orders": "plots/abmp_orders.png",
         "metrics": "plots/metrics.png"}


def json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (set, frozenset)):
    return sorted(o)
  return str(o)


def write_json(path: str, data: dict) -> None:
  """Write `data` as indented JSON atomically (fileio.atomic_write_text)."""
  fileio.atomic_write_text(path, json.dumps(data, indent=1, default=json_default, allow_nan=True) + "\n")


def orders_matrix(layers: list, n_layers: int, linears: tuple):
  """(M float [n_layers * len(linears), max blocks] of orders (NaN where a matrix has fewer blocks or no orders),
  row labels "L{layer}.{name}") from the per-matrix report entries; linears: the family's block linears in order
  (`Family.linears`)."""
  names = tuple(linears)
  width = max((len(e["orders"]) for e in layers if e.get("orders")), default=0)
  m = np.full((n_layers * len(names), max(width, 1)), np.nan)
  for e in layers:
    if e.get("orders"):
      m[e["layer"] * len(names) + names.index(e["name"]), :len(e["orders"])] = e["orders"]
  return m, [f"L{i}.{n}" for i in range(n_layers) for n in names]


def _legend_outside(ax, ncol: int = 1) -> None:
  """The legend to the right of the axes, never over the data."""
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, ncol=ncol, frameon=False)


def plot_layer_errors(layers: list, linears: tuple, path: str) -> None:
  """Relative output error per block (integer ticks), one line per linear of `linears` (log scale), legend
  outside."""
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator
  fig, ax = plt.subplots(figsize=(7.5, 4))
  for name in linears:
    pts = sorted((e["layer"], e["rel_err"]) for e in layers if e["name"] == name)
    if pts:
      ax.plot(*zip(*pts), marker="o", ms=3, label=name)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("block")
  ax.set_ylabel("||(W - W^) X|| / ||W X||")
  ax.set_yscale("log")
  ax.set_title("relative output error on the calibration data")
  _legend_outside(ax)
  ax.grid(alpha=0.3)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def plot_orders(layers: list, n_layers: int, linears: tuple, path: str) -> bool:
  """Heat map of the ABMP orders (layers x linears rows, column blocks columns). False when no orders."""
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap
  m, labels = orders_matrix(layers, n_layers, linears)
  if np.all(np.isnan(m)):
    return False
  fig, ax = plt.subplots(figsize=(min(16, 3 + 0.08 * m.shape[1]), min(30, 1.5 + 0.14 * m.shape[0])))
  im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap=ListedColormap(["#4575b4", "#e0e0e0", "#d73027"]),
                 vmin=0.5, vmax=3.5)
  ax.set_yticks(range(len(labels)))
  ax.set_yticklabels(labels, fontsize=max(3, min(8, 600 // max(len(labels), 1))))
  ax.set_xlabel("column block")
  ax.set_title("ABMP allocation: binary planes per column block")
  cb = fig.colorbar(im, ticks=[1, 2, 3])
  cb.set_label("order")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def _families(names) -> dict[str, list[str]]:
  """{metric family (the name before '/'): [names]}: one panel per family, so that every panel has one scale."""
  out: dict[str, list[str]] = {}
  for n in names:
    out.setdefault(n.split("/")[0], []).append(n)
  return out


def plot_metrics(metrics: dict, path: str, comparison: dict | None = None) -> bool:
  """One panel per metric family. With the paired comparison (eval/paired.py): quantized - FP per metric with
  its 95 % interval (1.96 standard errors) and a line at 0; without it: FP and quantized bars, legend outside."""
  import matplotlib.pyplot as plt
  if comparison:
    rows = dict(paired_lib.flatten(comparison))
    fams = _families(rows)
    fig, axes = plt.subplots(len(fams), 1, figsize=(7, 1.1 + 0.35 * len(rows) + 0.5 * len(fams)), squeeze=False,
                             gridspec_kw={"height_ratios": [len(v) for v in fams.values()]})
    for ax, (fam, names) in zip(axes[:, 0], fams.items()):
      y = np.arange(len(names))
      d = [rows[n]["delta"] for n in names]
      se = [1.96 * rows[n]["se"] if np.isfinite(rows[n]["se"]) else 0.0 for n in names]
      ax.barh(y, d, xerr=se, color=["#d73027" if v > 0 else "#4575b4" for v in d], alpha=0.8, capsize=3)
      ax.axvline(0, color="k", lw=0.8)
      ax.set_yticks(y)
      ax.set_yticklabels([n.split("/", 1)[-1] for n in names], fontsize=8)
      ax.invert_yaxis()
      ax.set_title(f"{fam}: quantized - FP (95 % interval)", fontsize=9, loc="left")
      ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
  fp, q = metrics.get("fp") or {}, metrics.get("quantized") or {}
  fams = _families(sorted(set(fp) | set(q)))
  if not fams:
    return False
  fig, axes = plt.subplots(1, len(fams), figsize=(2.0 + 1.6 * len(fams) + 0.3 * sum(map(len, fams.values())), 3.6),
                           squeeze=False, gridspec_kw={"width_ratios": [len(v) for v in fams.values()]})
  for ax, (fam, group) in zip(axes[0], fams.items()):
    x = np.arange(len(group))
    for off, (label, vals) in zip((-0.2, 0.2), (("FP", fp), ("quantized", q))):
      ax.bar(x + off, [vals.get(n, np.nan) for n in group], width=0.4, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels([n.split("/", 1)[-1] for n in group], rotation=45, ha="right", fontsize=8)
    ax.set_title(fam, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  _legend_outside(axes[0, -1])
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return True


def write_plots(workdir: str, report: dict) -> list[str]:
  """Write the PNG plots of `report` under workdir/plots; returns the written relative paths."""
  import matplotlib
  matplotlib.use("Agg")
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  out = []
  if report.get("layers"):
    linears = get_family(report["model"]["arch"]).linears
    plot_layer_errors(report["layers"], linears, os.path.join(workdir, PLOTS["layer_errors"]))
    out.append(PLOTS["layer_errors"])
    if plot_orders(report["layers"], report["model"]["n_layers"], linears,
                   os.path.join(workdir, PLOTS["abmp_orders"])):
      out.append(PLOTS["abmp_orders"])
  if plot_metrics(report.get("metrics", {}), os.path.join(workdir, PLOTS["metrics"]), report.get("comparison")):
    out.append(PLOTS["metrics"])
  return out


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
  out = []
  for k, v in d.items():
    if isinstance(v, dict):
      out += _flat(v, f"{prefix}{k}.")
    else:
      out.append((prefix + k, v))
  return out


def markdown(report: dict) -> str:
  """report.md: summary, sizes, FP vs quantized metrics, protocol card, per-matrix table, timings, plots."""
  cfg, m, s = report["config"], report["model"], report.get("sizes", {})
  q = cfg["quant"]
  lines = [f"# qdllm-jax run: {m['arch']} {os.path.basename(str(cfg['model_path']).rstrip('/'))}, "
           f"{q['method']} w{q['bits']} g{q['group_size']}", "",
           f"`{report.get('command', '')}`", "",
           f"- fingerprint `{report.get('fingerprint', '')}`; qdllm-jax {report.get('qdllm_jax_version')}; "
           f"created {report.get('created')}",
           f"- model: {m['n_layers']} blocks, d_model {m['d_model']}, mlp {m['mlp_hidden']}, vocab {m['vocab_size']}, "
           f"{m['num_params'] / 1e6:.2f} M params",
           f"- calibration: {report['calibration']['n_sequences']} sequences x {report['calibration']['seqlen']} "
           f"tokens from `{report['calibration']['source']}`, MCS {report['calibration']['mcs']}, masked fraction "
           f"{report['calibration']['mask_fraction']:.3f}",
           f"- mesh {report.get('mesh')}", _resume_line(report.get("resume")), "", "## Sizes", "",
           "| quantity | value |", "|---|---|"]
  for k in ("true_bits_per_weight", "model_bits_per_weight", "quantized_params", "quantized_bytes", "dense_bytes",
            "total_bytes", "checkpoint_nbytes", "disk_bytes", "fp_model_bytes", "checkpoint_sha256"):
    if k in s:
      lines.append(f"| {k} | {_fmt(s[k])} |")
  met = report.get("metrics", {})
  fp, qm = met.get("fp") or {}, met.get("quantized") or {}
  if fp or qm:
    lines += ["", "## Metrics", "", "| metric | FP | quantized | delta |", "|---|---|---|---|"]
    for n in sorted(set(fp) | set(qm)):
      a, b = fp.get(n), qm.get(n)
      d = b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ""
      lines.append(f"| {n} | {_fmt(a) if a is not None else ''} | {_fmt(b) if b is not None else ''} | {_fmt(d)} |")
  if report.get("comparison"):
    lines += ["", "## Paired comparison (quantized - FP, same items and random draws; eval/paired.py, "
              "eval/fidelity.py)", "",
              "| metric | delta | se | t | n |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['delta']:+.4g} | {v['se']:.3g} | {v['t']:.2f} | {v['n']} |"
              for k, v in paired_lib.flatten(report["comparison"])]
  if report.get("protocol"):
    lines += ["", "## Protocol card", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in _flat(report["protocol"])]
  if report.get("layers"):
    lines += ["", "## Per-matrix results", "", "| layer | linear | rule | rel. output error | loss | orders (1/2/3) "
              "| bits/weight |", "|---|---|---|---|---|---|---|"]
    for e in report["layers"]:
      o = e.get("orders")
      oc = "/".join(str(o.count(k)) for k in (1, 2, 3)) if o else ""
      lines.append(f"| {e['layer']} | {e['name']} | {e['method']} w{e['bits']} g{e['group_size']} | "
                   f"{e['rel_err']:.4g} | {_fmt(e.get('loss'))} | {oc} | {_fmt(e.get('bits_per_weight'))} |")
  lines += ["", "## Timings (s)", "", "every step over all the attempts in this workdir (quantize: the sum of the "
            "block times)", "", "| step | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.1f} |" for k, v in report.get("timings_s", {}).items()]
  runs = (report.get("resume") or {}).get("runs") or []
  if len(runs) > 1:
    steps = list(report.get("timings_s", {}))
    lines += ["", "| attempt | started | resumed from block | " + " | ".join(steps) + " |",
              "|---" * (3 + len(steps)) + "|"]
    lines += [f"| {i + 1} | {r['started']} | "
              f"{'reused checkpoint' if r.get('skipped_quantization') else _fmt(r.get('resumed_from_block') or '')} | "
              + " | ".join(f"{r['timings_s'][k]:.1f}" if k in r["timings_s"] else "" for k in steps) + " |"
              for i, r in enumerate(runs)]
  if report.get("plots"):
    lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({p})" for p in report["plots"]]
  return "\n".join(lines) + "\n"


def _resume_line(resume) -> str:
  if not resume:
    return "- resumed: unknown (no progress record)"
  if resume.get("reused_checkpoint"):
    return f"- resumed: no; this attempt ({resume['attempts']} in this workdir) reused the finished checkpoint"
  if resume.get("resumed"):
    return (f"- resumed: yes, from block {resume['resumed_from_block']} (attempt {resume['attempts']} in this "
            "workdir; timings below include the earlier attempts)")
  return f"- resumed: no (attempt {resume['attempts']} in this workdir)"


def write_report(workdir: str, report: dict, *, plots: bool = True) -> dict:
  """Write report.json, report.md and (plots=True) the PNGs into workdir; returns the report with its
  "plots" list filled in."""
  report = dict(report)
  report["plots"] = write_plots(workdir, report) if plots else []
  write_json(os.path.join(workdir, "report.json"), report)
  fileio.atomic_write_text(os.path.join(workdir, "report.md"), markdown(report))
  return report
