"""The PTQ study runner (`python -m qdllm_jax.study`): entry parsing, the table's arithmetic, an end-to-end study
on the random tiny model, per-entry resume, and bad input refused before loading."""
import json
import os

import numpy as np
import pytest
from launch_common import ROOT

from qdllm_jax import study
from qdllm_jax.errors import ConfigError

CFG = os.path.join(ROOT, "configs", "study_tiny.py")


def _argv(model_dir, wd, entries, *extra):
  return ["--config", CFG, "--workdir", str(wd), f"--config.model_path={model_dir}", f"--config.entries={entries}",
          "--config.calib.nsamples=4", "--config.calib.seqlen=32", "--config.weight_only.group_size=32",
          "--config.duquant.block_size=32", "--config.duquant.max_steps=8", "--config.eval.protocol=tiny_smoke",
          "--config.eval.limit=2", "--config.plots=False", *extra]


@pytest.mark.parametrize("text,expect", [("fp", ("fp", 16, 16)), ("gptq:w4a16", ("gptq", 4, 16)),
                                         ("DuQuant:W4A4", ("duquant", 4, 4)), ("quarot:w8a8", ("quarot", 8, 8))])
def test_parse_entry(text, expect):
  e = study.parse_entry(text)
  assert (e.method, e.w_bits, e.a_bits) == expect


@pytest.mark.parametrize("bad", ["gptq", "gptq:w4a4", "awq:w4a8", "smoothquant:w4a16", "foo:w4a16", "fp:w4a16",
                                 "gptq:w9a16", "rtn:w1a16", "duquant:w4a1"])
def test_parse_entry_refuses(bad):
  with pytest.raises(ConfigError, match="study entry"):
    study.parse_entry(bad)


def test_registered_methods_parse_and_declare_schema_sections():
  """Every registered study method is an entry name, and the sections it fingerprints are study config sections."""
  from qdllm_jax import config_schema
  from qdllm_jax.baselines import study_registry
  sections = set(config_schema.sections(config_schema.StudySpec))
  for name, m in study_registry.REGISTRY.items():
    assert m.name == name and set(m.sections) <= sections, name
    e = study.parse_entry(f"{name}:w4a4" if m.weight_activation else f"{name}:w4a16")
    assert e.method == name
  assert {study.parse_entry(e).method for e in study.defaults().entries} <= set(study_registry.REGISTRY) | {"fp"}


def test_fingerprint_hashes_the_shared_settings_and_the_methods_sections():
  """The cache key of a row, written out: sha256 of [entry, {dtype, seed, calib, eval, own sections}, model digest]
  (unchanged configs keep their cached rows); another method's section does not change it."""
  import hashlib
  d = study.defaults().to_dict()
  own = {"fp": (), "gptq:w4a16": ("weight_only",), "awq:w3a16": ("awq", "weight_only"),
         "quarot:w4a4": ("quarot",), "duquant:w8a8": ("duquant",)}
  for text, sections in own.items():
    e = study.parse_entry(text)
    shared = {k: d[k] for k in ("dtype", "seed", "calib", "eval", *sections)}
    blob = json.dumps([{"method": e.method, "w_bits": e.w_bits, "a_bits": e.a_bits}, shared, "digest"], sort_keys=True)
    assert study._fingerprint(e, d, "digest") == hashlib.sha256(blob.encode()).hexdigest()[:16], text
  e = study.parse_entry("gptq:w4a16")
  assert study._fingerprint(e, dict(d, awq={"n_grid": 3}), "x") == study._fingerprint(e, d, "x")
  assert study._fingerprint(e, dict(d, weight_only={"group_size": 64}), "x") != study._fingerprint(e, d, "x")


def test_table_arithmetic():
  """Avg = mean of the per-family task cells, Drop = (Avg - Avg_FP) / Avg_FP, PPL change relative; by hand."""
  fp = dict(entry=dict(method="fp", w_bits=16, a_bits=16), setting="FP",
            metrics={"mc_acc/a": 0.8, "gen_em/b": 0.6, "mc_acc/all": 0.8, "elbo_ppl": 100.0})
  q = dict(entry=dict(method="gptq", w_bits=3, a_bits=16), setting="W3A16",
           metrics={"mc_acc/a": 0.7, "gen_em/b": 0.5, "mc_acc/all": 0.7, "elbo_ppl": 110.0})
  lines = study.table([fp, q]).splitlines()
  assert lines[0] == ("| Method | Setting | EM b | MC a | Avg | Drop | ELBO PPL | PPL change | ΔELBO x1e3 (t) | "
                      "ΔMC NLL (t) |")
  assert lines[2] == "| – | FP | 60.0 | 80.0 | 70.0 | – | 100.0 | – | – | – |"
  assert lines[3] == "| gptq | W3A16 | 50.0 | 70.0 | 60.0 | -14.3% | 110.0 | +10.00% | – | – |"  # no per-item data
  # with per-item results: paired deltas against FP (window NLLs over 10 tokens each; one MC family)
  fp["paired"] = {"key_data": [0, 1], "window_nll": [50.0, 52.0, 49.0], "window_tokens": [10, 10, 10],
                  "choice_nll": {"a": [0.1, 0.2, 0.0]}}
  q["paired"] = {"key_data": [0, 1], "window_nll": [51.0, 52.5, 50.0], "window_tokens": [10, 10, 10],
                 "choice_nll": {"a": [0.3, 0.2, 0.1]}}
  d = np.array([0.1, 0.05, 0.1])  # per-window nats/token; t = mean / (sd / sqrt(3))
  t_elbo = d.mean() / (d.std(ddof=1) / np.sqrt(3))
  m = np.array([0.2, 0.0, 0.1])
  t_mc = m.mean() / (m.std(ddof=1) / np.sqrt(3))
  assert study.table([fp, q]).splitlines()[3].endswith(f"| {1e3 * d.mean():+.3g} ({t_elbo:+.1f}) | "
                                                        f"{m.mean():+.3g} ({t_mc:+.1f}) |")


def test_study_end_to_end_and_resume(model_dir, tmp_path, monkeypatch):
  from qdllm_jax.eval import suite
  from qdllm_jax.key_tree import purpose_key
  from qdllm_jax.models import hf_checkpoint, hf_tokenizer
  entries = "fp,gptq:w3a16,smoothquant:w8a8,duquant:w4a4"
  assert study.main(_argv(model_dir, tmp_path, entries)) == 0
  out = json.load(open(tmp_path / "study.json"))
  rows = {r["entry"]["method"] + r["setting"]: r for r in out["rows"]}
  assert list(rows) == ["fpFP", "gptqW3A16", "smoothquantW8A8", "duquantW4A4"]
  md = open(tmp_path / "study.md").read()
  assert md.count("\n| ") == 1 + 4 and "duquant | W4A4" in md
  # The FP row is exactly what the suite gives the loaded model under the same key and limit.
  model, tok = hf_checkpoint.load_pretrained(model_dir, "float32"), hf_tokenizer.load_tokenizer(model_dir)
  ref = suite.evaluate(model, tok, "tiny_smoke", key=purpose_key(0, "eval"), limit=2)["metrics"]
  assert rows["fpFP"]["metrics"] == pytest.approx(ref, rel=1e-6)
  for r in out["rows"]:
    assert np.isfinite(list(r["metrics"].values())).all()
    assert len(r["paired"]["window_nll"]) == len(r["paired"]["window_tokens"]) > 0
  assert "ΔELBO x1e3 (t)" in md

  calls = []
  real_build = study.build
  monkeypatch.setattr(study, "build", lambda e, *a, **k: calls.append(e.slug) or real_build(e, *a, **k))
  assert study.main(_argv(model_dir, tmp_path, entries)) == 0  # everything cached
  assert calls == []
  assert study.main(_argv(model_dir, tmp_path, entries, "--config.smoothquant.alpha=0.6")) == 0
  assert calls == ["smoothquant_w8a8"]  # only the entry whose settings changed is recomputed


@pytest.mark.parametrize("extra,msg", [
    (["--config.entries=gptq:w4a16"], "needs 'fp'"),
    (["--config.entries=fp,gptq:w4a4"], "weight-only"),
    (["--config.entries=fp,fp"], "repeats"),
    (["--config.model_path=/nonexistent/model"], "not a model directory"),
    (["--config.quarot.w_method=awq"], "w_method"),
    (["--config.duquant.a_clip=1.5"], "clip"),
    (["--config.bogus=1"], "unknown key"),
])
def test_bad_input_refused_before_loading(model_dir, tmp_path, monkeypatch, capsys, extra, msg):
  from qdllm_jax.models import hf_checkpoint
  monkeypatch.setattr(hf_checkpoint, "load_pretrained", lambda *a, **k: pytest.fail("loaded before validating"))
  argv = ["--config", CFG, "--workdir", str(tmp_path), f"--config.model_path={model_dir}", *extra]
  assert study.main(argv) == 2
  assert msg in capsys.readouterr().err
