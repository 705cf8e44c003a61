"""benchmarks/accel_check.sh, its table (accel_table.py) and the decode benchmark it runs (bench_decode.py), on CPU."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "accel_check.sh")


@pytest.fixture
def benchmarks_path(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))


def _accel_check(tmp_path, path_dirs=(), **env):
  e = {k: v for k, v in os.environ.items() if k != "PYTHON"}
  e.update(env, OUT=str(tmp_path / "out"), PYTHON=env.get("PYTHON", sys.executable))
  e["PATH"] = os.pathsep.join([*map(str, path_dirs), e["PATH"]])
  return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=e, timeout=120)


def _fake(tmp_path, name, text):
  d = tmp_path / "bin"
  d.mkdir(exist_ok=True)
  (d / name).write_text("#!/bin/sh\n" + text)
  (d / name).chmod(0o755)
  return d


def test_cpu_machine_says_no_accelerator(tmp_path):
  p = _accel_check(tmp_path)
  assert p.returncode == 0, p.stderr
  assert "no accelerator is present (JAX backend: cpu)" in p.stdout


def test_gpu_machine_with_cpu_jax_fails(tmp_path):
  """nvidia-smi lists a GPU but JAX runs on the CPU: exit 1, naming jax[cuda12]."""
  bindir = _fake(tmp_path, "nvidia-smi", 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\n')
  p = _accel_check(tmp_path, [bindir])
  assert p.returncode == 1
  assert "jax[cuda12]" in p.stderr and "no accelerator" not in p.stdout


def test_python_without_jax_fails(tmp_path):
  fake = _fake(tmp_path, "python", "echo \"ModuleNotFoundError: No module named 'jax'\" >&2; exit 1\n") / "python"
  p = _accel_check(tmp_path, PYTHON=str(fake))
  assert p.returncode == 1
  assert "cannot import jax" in p.stderr and "PYTHON=" in p.stderr


def test_bench_decode_accepts_every_flag_of_accel_check(benchmarks_path):
  """The bench_decode command line of accel_check.sh (its $VARIABLES filled in) parses with bench_decode's parser."""
  import bench_decode
  text = open(SCRIPT, encoding="utf-8").read().replace("\\\n", " ")
  line = next(ln for ln in text.splitlines() if "benchmarks/bench_decode.py" in ln)
  words = shlex.split(line.split("benchmarks/bench_decode.py", 1)[1].split(">")[0])
  words = [re.sub(r"\$\{?(\w+)\}?", lambda m: {"BLOCKS": "4"}.get(m.group(1), "x"), w) for w in words]
  assert "--blocks" in words and "--json" in words
  args = bench_decode.build_parser().parse_args(words)
  assert args.blocks == 4 and args.batches == [1, 8] and args.gen == 64 and args.steps == 16


def test_table_from_small_files(tmp_path, benchmarks_path):
  import accel_table
  (tmp_path / "pallas.xml").write_text(
      '<testsuites><testsuite time="3.5"><testcase name="a"/><testcase name="b"><failure/></testcase>'
      '<testcase name="c"><skipped/></testcase></testsuite></testsuites>')
  rows = [dict(part="stack", weights="dense bf16", batch=1, tokens_per_s=100.0, step_ms=10.0, weight_mb_per_token=8.0,
               device_peak_mib=None, host_peak_mib=900.0, speedup_vs_base=None),
          dict(part="stack", weights="int2", batch=1, tokens_per_s=250.0, step_ms=4.0, weight_mb_per_token=1.1,
               device_peak_mib=321.5, host_peak_mib=700.0, speedup_vs_base=2.5)]
  (tmp_path / "decode.json").write_text(json.dumps({"rows": rows}))
  out = accel_table.table(str(tmp_path), "pallas_gpu", 1, 4, 0).splitlines()
  assert any("pallas_gpu compiled" in ln and "1 passed, 1 failed, 1 skipped (3.5 s)" in ln and "FAILED: b" in ln
             for ln in out)
  assert any("xla path" in ln and "did not run" in ln for ln in out)
  dense = next(ln for ln in out if "dense bf16 batch 1" in ln)
  packed = next(ln for ln in out if "int2 batch 1" in ln)
  assert "100.0 tokens/s" in dense and "n/a MiB" in dense and "vs dense" not in dense
  assert "250.0 tokens/s" in packed and "321.5 MiB" in packed and "x2.50 vs dense" in packed
  assert "failed" in accel_table.table(str(tmp_path), "pallas_gpu", 0, 0, 2).splitlines()[-3]


@pytest.mark.slow
def test_bench_decode_end_to_end_small_stack(tmp_path):
  """Two configurations (dense bf16, int2), each in its own process, on a 128-wide 1-block stack: rows with the
  exact dense weight traffic, per-process peaks, and the ratio to dense (~25 s on 2 loaded cores: slow)."""
  out = tmp_path / "decode.json"
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_decode.py"), "--parts", "stack", "--stack_dims",
         "128,4,256", "--blocks", "1", "--vocab", "256", "--formats", "int2", "--batches", "1", "--prompt", "4",
         "--gen", "4", "--steps", "2", "--iters", "1", "--json", str(out)]
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert p.returncode == 0, p.stdout + p.stderr
  rows = json.loads(out.read_text())["rows"]
  assert [(r["weights"], r["batch"]) for r in rows] == [("dense bf16", 1), ("int2", 1)]
  dense, int2 = rows
  weights = 4 * 128 * 128 + 3 * 128 * 256                     # q k v o + gate up down of one block
  assert dense["weight_mb_per_token"] == pytest.approx(2 * weights * 2 / 4 / 1e6)   # bf16, 2 steps, 4 tokens
  assert 0.1 < int2["weight_mb_per_token"] / dense["weight_mb_per_token"] < 0.2
  assert int2["speedup_vs_base"] == pytest.approx(int2["tokens_per_s"] / dense["tokens_per_s"])
  for r in rows:
    assert r["device_peak_mib"] is None and r["host_peak_mib"] > 50 and r["xla_peak_mib"] > 0
