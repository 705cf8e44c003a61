"""Issue 3's decision on the real encoder: 2-bit damage is resolved by the fidelity protocol (eval/fidelity.py).

RTN-W2 g128 and GPTQ-W4 g128 of all-MiniLM-L6-v2 (the package pipeline, MCS-calibrated on KJV training text) are
scored against FP on the same held-out sentences and masks; the paired comparison RTN-W2 - GPTQ-W4 must say
RTN-W2 is worse on every metric (t > 3 for the hidden-state errors, t < -3 for the embedding cosine and the
similarity correlations). On the 2-block truncation and on the whole model; both are slow-marked: the
truncated one took 179 s on the shared 2-core machine at load 16 (compiles and the pipeline's captures dominate).
"""
import dataclasses

import jax
import pytest
from bert_fixtures import minilm2_dir, minilm_dir  # noqa: F401  (fixtures)

from qdllm_jax.calib import mcs
from qdllm_jax.calib import text_windows as windows_lib
from qdllm_jax.data import corpus
from qdllm_jax.eval import fidelity, protocols
from qdllm_jax.models import hf_checkpoint, hf_tokenizer
from qdllm_jax.models.model import Model
from qdllm_jax.quant import pipeline, rules


def _rtn2_vs_gptq4(path, n_windows, seqlen, n_sentences, batch=64):
  reader = hf_checkpoint.open_checkpoint(path)
  cfg, tok = reader.config, hf_tokenizer.load_tokenizer(path)
  docs = windows_lib.tokenize_documents(corpus.load_splits()["train"][::8], tok)
  ids = mcs.calibration_inputs(windows_lib.make_windows(docs, n_windows, seqlen, jax.random.key(0)), cfg)
  spec = dataclasses.replace(protocols.MINILM_FIDELITY.fidelity, n_sentences=n_sentences,
                             jackknife_groups=min(32, n_sentences), batch=batch)
  inputs = fidelity.fidelity_inputs(tok, spec, seed=0, mask_id=cfg.mask_id)
  ref = fidelity.encode_states(fidelity.model_states_fn(hf_checkpoint.load_pretrained(path)), inputs, spec.batch)
  vals = {}
  for name, method, bits in (("rtn2", "rtn", 2), ("gptq4", "gptq", 4)):
    params, _ = pipeline.quantize_model(reader, ids, rules.default_rules(method, bits, 128), dequantize=True)
    vals[name] = fidelity.fidelity_values(
        ref, fidelity.encode_states(fidelity.model_states_fn(Model(params, cfg)), inputs, spec.batch), inputs)
  return fidelity.paired_fidelity(vals["rtn2"], vals["gptq4"], groups=spec.jackknife_groups), vals


def _check_rtn2_worse(c):
  print({k: (v if "delta" in v else {s: round(x["t"], 1) for s, x in v.items()}) for k, v in c.items()})
  assert set(c["rel_err"]) == {"plain", "mask0.15", "mask0.5", "mask0.9"}
  for inp, s in c["rel_err"].items():
    assert s["delta"] > 0 and s["t"] > 3, inp
  for m in ("emb_cos", "sim_pearson", "sim_spearman"):
    assert c[m]["delta"] < 0 and c[m]["t"] < -3, m


@pytest.mark.slow
def test_rtn2_resolved_worse_than_gptq4_on_two_blocks(minilm2_dir):  # noqa: F811
  c, vals = _rtn2_vs_gptq4(minilm2_dir, 8, 64, 48, batch=48)  # one forward per input set
  _check_rtn2_worse(c)
  assert fidelity.fidelity_metrics(vals["gptq4"])["emb_cos"] > fidelity.fidelity_metrics(vals["rtn2"])["emb_cos"]


@pytest.mark.slow
def test_rtn2_resolved_worse_than_gptq4_on_the_whole_model(minilm_dir):  # noqa: F811
  c, _ = _rtn2_vs_gptq4(minilm_dir, 64, 128, 256)
  _check_rtn2_worse(c)
