"""Why does Quant-dLLM (DAQ) not beat GPTQ at 2 bits on the shipped tiny model? A per-matrix sweep.

    python3 scripts/layer_error_sweep.py                    # the tiny model, MCS calibration of configs/tiny.py
    python3 scripts/layer_error_sweep.py --out docs/layer_error_sweep.md

Every block linear of the FP model is quantized on its own, from the Hessian of the FP model's own inputs (MCS
calibration of configs/tiny.py: 32 x 128), under a list of quantizer settings; for each setting the script
prints the true bits per weight, the mean/max relative output error ||(W - W^) X|| / ||W X|| over the 28
matrices, and on how many matrices it beats GPTQ 2-bit g64 (the setting of the results table). Controls: the
same shapes and Hessians with Gaussian weights of the same per-row norms (trained structure removed), and the
1024-column `ff_out` matrices alone (the widest rows: 16 blocks of 64).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

SETTINGS = [  # (label, quantize_weight kwargs)
    ("GPTQ W2 g64 (table)", dict(method="gptq", bits=2, group_size=64)),
    ("GPTQ W2 g128", dict(method="gptq", bits=2, group_size=128)),
    ("GPTQ W2 g32", dict(method="gptq", bits=2, group_size=32)),
    ("RTN W2 g64", dict(method="rtn", bits=2, group_size=64)),
    ("DAQ o2 b64 ABMP .25 (table)", dict(method="quant_dllm", bits=2, group_size=64, abmp_ratio=0.25)),
    ("DAQ o2 b64 uniform", dict(method="quant_dllm", bits=2, group_size=64, abmp_ratio=0.0)),
    ("DAQ o2 b64 uniform, no DOR", dict(method="quant_dllm", bits=2, group_size=64, abmp_ratio=0.0, dor=False)),
    ("DAQ o2 b64 uniform, no comp.", dict(method="quant_dllm", bits=2, group_size=64, abmp_ratio=0.0,
                                          compensation=False)),
    ("DAQ o2 b64 ABMP .25, block comp.", dict(method="quant_dllm", bits=2, group_size=64, abmp_ratio=0.25,
                                             comp_mode="block")),
    ("DAQ o2 b64 uniform, block comp.", dict(method="quant_dllm", bits=2, group_size=64, abmp_ratio=0.0,
                                             comp_mode="block")),
    ("DAQ o2 b128 uniform", dict(method="quant_dllm", bits=2, group_size=128, abmp_ratio=0.0)),
    ("DAQ o2 b32 uniform", dict(method="quant_dllm", bits=2, group_size=32, abmp_ratio=0.0)),
    ("DAQ o3 b64 uniform", dict(method="quant_dllm", bits=3, group_size=64, abmp_ratio=0.0)),
]


def tiny_hessians():
  """[(name, W float32 [out, in], H float32 [in, in])] for the 28 linears, H from the FP model's own inputs."""
  import jax

  from qdllm_jax import config_check as config_lib
  from qdllm_jax import launch
  from qdllm_jax.calib import capture
  from qdllm_jax.calib.calibration import calibration
  from qdllm_jax.models import hf_checkpoint, hf_tokenizer, transformer
  spec = config_lib.validate(launch.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")),
                             workdir=tempfile.mkdtemp(prefix="layer-error-sweep-"))
  model = hf_checkpoint.load_pretrained(spec.model_path, "float32")
  tok = hf_tokenizer.load_tokenizer(spec.model_path)
  _, ids, _ = calibration(spec.calib, spec.seed, tok, model.config)
  x = transformer.embed(model.params, jax.numpy.asarray(ids))
  out = []
  for i, p in enumerate(model.params["blocks"]):
    cap = capture.capture_block(p, x, model.config, chunk_size=8)
    for tap, names in transformer.LINEAR_GROUPS.items():
      out += [(f"b{i}.{n}", np.asarray(p[n], np.float32), np.asarray(cap.hessians[tap], np.float32)) for n in names]
    x = cap.outputs
  return out


def gaussian_like(w, rng):
  g = rng.standard_normal(w.shape).astype(np.float32)
  return g * (np.linalg.norm(w, axis=1, keepdims=True) / np.linalg.norm(g, axis=1, keepdims=True))


def sweep(layers, settings):
  from qdllm_jax.quant import quantize_weight
  rows = []
  for label, kw in settings:
    t0, errs, bpw, n = time.time(), [], 0.0, 0
    for _, w, h in layers:
      qw, info = quantize_weight(w, h, return_info=True, **kw)
      errs.append(float(np.sqrt(info["relative_sq_output_error"])))
      bpw, n = bpw + qw.bits_per_weight * w.size, n + w.size
    rows.append(dict(label=label, bpw=bpw / n, errs=np.asarray(errs), seconds=time.time() - t0))
  return rows


def render(title, rows):
  ref = rows[0]["errs"]
  out = [f"**{title}**", "", "| setting | true bits/weight | mean rel. error | max | beats GPTQ W2 g64 on |",
         "|---|---|---|---|---|"]
  for r in rows:
    wins = int(np.sum(r["errs"] < ref))
    out.append(f"| {r['label']} | {r['bpw']:.3f} | {r['errs'].mean():.4f} | {r['errs'].max():.4f} | "
               f"{wins}/{len(ref)} |")
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="also write the markdown tables here")
  ap.add_argument("--no-controls", action="store_true")
  a = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  layers = tiny_hessians()
  parts = [render("Tiny model, trained weights (28 matrices)", sweep(layers, SETTINGS))]
  print(parts[-1], flush=True)
  if not a.no_controls:
    gauss = [(n, gaussian_like(w, rng), h) for n, w, h in layers]
    parts.append(render("Same shapes and Hessians, Gaussian weights of the same row norms", sweep(gauss, SETTINGS)))
    print(parts[-1], flush=True)
    sel = [s for s in SETTINGS if s[1]["group_size"] in (64, 128)]
    parts.append(render("The 1024-column matrices only (ff_out), trained weights", sweep(
        [(n, w, h) for n, w, h in layers if w.shape[1] == 1024], sel)))
    print(parts[-1], flush=True)
  if a.out:
    with open(a.out, "w", encoding="utf-8") as f:
      f.write("\n\n".join(parts) + "\n")


if __name__ == "__main__":
  main()
