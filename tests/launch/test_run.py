"""End-to-end runs of configs/tiny.py on a random tiny LLaDA: outputs, sizes, fingerprints, resume.

References: closed-form packed sizes from the reported ABMP orders (arXiv 2510.03274, DAQ and ABMP: P = sum of orders
planes of r x g signs, P (r + g) fp16 scales, one int8 order per block, one int32 plane index per plane), the
ABMP counts r = min(floor(nb ratio), floor(nb / 2)) per matrix, the parameter count from the model shapes, and
an uninterrupted run for the resumed ones (bit-identical checkpoints).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from launch_common import ARCH, ROOT, fast_argv, make_model

from qdllm_jax import launch
from qdllm_jax import run as run_lib
from qdllm_jax import workdir as workdir_lib
from qdllm_jax.checkpoint import integrity, quantized

EVAL = ["--config.eval.protocol=tiny_smoke", "--config.eval.limit=4", "--config.report.plots=True"]


@pytest.fixture(scope="module")
def main_run(model_dir, tmp_path_factory):
  wd = tmp_path_factory.mktemp("main") / "run"
  assert launch.main(fast_argv(model_dir, wd, *EVAL)) == 0
  with open(wd / "report.json") as f:
    return wd, json.load(f)


def test_a_tiny_run_writes_every_output(main_run):
  wd, rep = main_run
  for f in ("fingerprint.json", "quant_report.json", "eval_fp.json", "report.json", "report.md", "run.log",
            "checkpoint/qdllm_checkpoint.json", "checkpoint/config.json", "checkpoint/tokenizer.json"):
    assert (wd / f).is_file(), f
  assert not (wd / "state").exists()  # removed once the checkpoint is saved
  assert sorted(rep["plots"]) == ["plots/abmp_orders.png", "plots/layer_errors.png", "plots/metrics.png"]
  for p in rep["plots"]:
    assert (wd / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(rep["layers"]) == ARCH["n_layers"] * 7
  assert all(0 < e["rel_err"] < 1 for e in rep["layers"])
  for k in ("fp", "quantized"):
    assert np.isfinite(rep["metrics"][k]["elbo_ppl"]) and "mc_acc/all" in rep["metrics"][k]
    assert "details" not in rep["evaluation"][k]  # per-item results feed the comparison, not the report
  # the paired comparison (same protocol and eval key): its deltas are the metric differences
  c, fp, q = rep["comparison"], rep["metrics"]["fp"], rep["metrics"]["quantized"]
  assert c["elbo_nats_per_token"]["delta"] == pytest.approx(q["elbo_nats_per_token"] - fp["elbo_nats_per_token"],
                                                            rel=1e-9, abs=1e-12)
  assert c["mc_nll"]["all"]["delta"] == pytest.approx(q["mc_nll/all"] - fp["mc_nll/all"], abs=1e-9)
  assert c["gen_em"]["all"]["delta"] == pytest.approx(q["gen_em/all"] - fp["gen_em/all"])
  assert "## Paired comparison" in (wd / "report.md").read_text()
  assert rep["protocol"]["name"] == "tiny_smoke" and rep["evaluation"]["quantized"]["protocol"]["limit"] == 4
  assert rep["calibration"]["n_sequences"] == 4 and rep["calibration"]["seqlen"] == 32
  assert 0 < rep["calibration"]["mask_fraction"] < 1
  assert set(rep["timings_s"]) >= {"load", "calibrate", "quantize", "save", "evaluate", "total"}
  assert len(rep["rules"]["modules"]) == ARCH["n_layers"] * 7
  md = (wd / "report.md").read_text()
  assert "| elbo_ppl |" in md and "## Protocol card" in md and "| true_bits_per_weight |" in md


def test_checkpoint_bytes_match_the_reported_true_bits(main_run):
  wd, rep = main_run
  d, f, v, g = ARCH["d_model"], ARCH["mlp_hidden_size"], 320, 32
  shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (f, d), "up": (f, d), "down": (d, f)}
  q_bytes, q_params = 0, 0
  for e in rep["layers"]:
    r, c = shapes[e["name"]]
    orders, nb = e["orders"], c // g
    r_abmp = min(int(np.floor(nb * 0.25)), nb // 2)  # ABMP: r blocks at order 1, r at 3, the rest at 2
    assert sorted(orders) == [1] * r_abmp + [2] * (nb - 2 * r_abmp) + [3] * r_abmp
    p = sum(orders)
    q_bytes += p * r * (g // 32) * 4 + p * (r + g) * 2 + nb + 4 * p
    q_params += r * c
  n_params = 2 * v * d + ARCH["n_layers"] * (4 * d * d + 3 * d * f + 2 * d) + d
  s = rep["sizes"]
  assert (s["quantized_bytes"], s["quantized_params"]) == (q_bytes, q_params)
  assert s["checkpoint_nbytes"] == q_bytes + (n_params - q_params) * 4  # the rest stays float32
  assert s["true_bits_per_weight"] * q_params / 8 == pytest.approx(q_bytes, rel=1e-12)
  assert s["model_bits_per_weight"] * n_params / 8 == pytest.approx(s["checkpoint_nbytes"], rel=1e-12)
  assert s["checkpoint_sha256"] == workdir_lib.content_digest(str(wd / "checkpoint"))


def test_same_command_again_reuses_the_checkpoint(main_run, model_dir, tmp_path, caplog):
  wd, rep = main_run
  copy = tmp_path / "run"
  shutil.copytree(wd, copy)
  with caplog.at_level("INFO", logger="qdllm_jax"):
    assert launch.main(fast_argv(model_dir, copy, "--config.eval.protocol=")) == 0
  assert "is complete; skipping quantization" in caplog.text
  assert workdir_lib.content_digest(str(copy / "checkpoint")) == rep["sizes"]["checkpoint_sha256"]


def test_another_run_in_the_workdir_is_refused_without_overwrite(main_run, model_dir, tmp_path, capsys):
  wd, rep = main_run
  copy = tmp_path / "run"
  shutil.copytree(wd, copy)
  assert launch.main(fast_argv(model_dir, copy, "--config.calib.seed_x=7")) == 2
  err = capsys.readouterr().err
  assert "--overwrite" in err and "calibration" in err and rep["fingerprint"] in err
  assert json.loads((copy / "fingerprint.json").read_text())["fingerprint"] == rep["fingerprint"]
  assert launch.main(fast_argv(model_dir, copy, "--config.calib.seed_x=7", "--overwrite")) == 0
  new = json.loads((copy / "report.json").read_text())
  assert new["fingerprint"] != rep["fingerprint"] and new["config"]["calib"]["seed_x"] == 7
  assert new["sizes"]["checkpoint_sha256"] != rep["sizes"]["checkpoint_sha256"]
  assert not (copy / "plots").exists() and not (copy / "eval_fp.json").exists()  # old outputs were removed


class _Interrupted(BaseException):
  pass


def test_an_interrupted_run_resumes_to_the_same_checkpoint(main_run, model_dir, tmp_path, monkeypatch, caplog):
  """In process: the run stops right after block 1's state is saved (where --kill_after_block sends SIGKILL)."""
  wd, rep = main_run
  run_wd = tmp_path / "run"

  def fake_kill(pid, sig):
    assert pid == os.getpid() and sig == signal.SIGKILL
    raise _Interrupted

  monkeypatch.setattr(run_lib.os, "kill", fake_kill)
  with pytest.raises(_Interrupted):
    launch.main(fast_argv(model_dir, run_wd, "--kill_after_block", "1"))
  assert sorted(os.listdir(run_wd / "state")) == ["blocks", "state-000001"] and not (run_wd / "checkpoint").exists()
  monkeypatch.undo()
  with caplog.at_level("INFO", logger="qdllm_jax"):
    assert launch.main(fast_argv(model_dir, run_wd)) == 0
  assert "resuming after block 1 of 2" in caplog.text
  got = json.loads((run_wd / "report.json").read_text())
  assert got["fingerprint"] == rep["fingerprint"]
  # "the same checkpoint" (docs/launch.md): every stored array bit-identical (dtype, shape, bytes) and the same
  # checkpoint_sha256 (arrays + sidecar + config.json), though the Orbax files themselves may differ
  assert got["sizes"]["checkpoint_sha256"] == rep["sizes"]["checkpoint_sha256"]
  a, b = (dict(quantized.iter_parts(str(w / "checkpoint"))) for w in (wd, run_wd))
  assert a.keys() == b.keys()
  for part in a:
    fa, fb = integrity.flat_arrays(a[part]), integrity.flat_arrays(b[part])
    assert fa.keys() == fb.keys()
    for k in fa:
      assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape and fa[k].tobytes() == fb[k].tobytes(), k
  assert [e["rel_err"] for e in got["layers"]] == [e["rel_err"] for e in rep["layers"]]
  # the report says it resumed, from which block, and keeps the earlier attempt's block times
  assert got["resume"]["resumed"] and got["resume"]["resumed_from_block"] == 1 and got["resume"]["attempts"] == 2
  assert len(got["resume"]["block_s"]) == 2 and got["timings_s"]["quantize"] == pytest.approx(
      sum(got["resume"]["block_s"]))
  assert "resumed: yes, from block 1" in (run_wd / "report.md").read_text()


def _cli(argv, **kw):
  return subprocess.Popen([sys.executable, "-m", "qdllm_jax.launch", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sigkill_after_the_first_block_then_resume_is_bit_exact(main_run, model_dir, tmp_path):
  """A real kill -9 of the CLI right after block 1's state is written, then the same command again."""
  wd, rep = main_run
  run_wd = tmp_path / "run"
  p = _cli(fast_argv(model_dir, run_wd, "--kill_after_block", "1"))
  out, _ = p.communicate(timeout=600)
  assert p.returncode == -signal.SIGKILL, out
  assert sorted(os.listdir(run_wd / "state")) == ["blocks", "state-000001"]
  p = _cli(fast_argv(model_dir, run_wd))
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  assert "resuming after block 1 of 2" in out
  got = json.loads((run_wd / "report.json").read_text())
  assert got["sizes"]["checkpoint_sha256"] == rep["sizes"]["checkpoint_sha256"]


@pytest.mark.slow
def test_external_sigkill_at_a_random_point_then_resume_is_bit_exact(tok_dir, tmp_path):
  """kill -9 from outside as soon as the first state exists (mid-block or mid-write), on a 6-block model; the
  resumed run's checkpoint equals an uninterrupted run's."""
  model = tmp_path / "model6"
  make_model(model, tok_dir, seed=1, n_layers=6)
  ref_wd, run_wd = tmp_path / "ref", tmp_path / "run"
  assert launch.main(fast_argv(str(model), ref_wd)) == 0
  ref = json.loads((ref_wd / "report.json").read_text())["sizes"]["checkpoint_sha256"]
  p = _cli(fast_argv(str(model), run_wd))
  deadline = time.time() + 600
  while not (run_wd / "state").is_dir() or not any(n.startswith("state-") for n in os.listdir(run_wd / "state")):
    assert p.poll() is None and time.time() < deadline, "the run ended before its first state was saved"
    time.sleep(0.02)
  time.sleep(0.3)
  p.kill()
  p.wait()
  assert p.returncode == -signal.SIGKILL, "the run finished before the kill; use a model with more blocks"
  assert not (run_wd / "checkpoint").exists()
  p = _cli(fast_argv(str(model), run_wd))
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  assert "resuming after block" in out
  assert json.loads((run_wd / "report.json").read_text())["sizes"]["checkpoint_sha256"] == ref
