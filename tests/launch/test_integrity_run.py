"""Integrity of the launch: bad inputs get messages, a changed model is noticed, killed saves leave nothing behind.

References: NaN injected with safetensors into a copy of the model (the tensor named independently here), file
contents written by the test (line numbers counted here), process ids of processes known to have exited, and
argparse's own help text.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from launch_common import ROOT, fast_argv
from safetensors.numpy import load_file

from qdllm_jax import launch
from qdllm_jax.calib import text_windows
from qdllm_jax.errors import ConfigError

NAN_TENSOR = "model.transformer.blocks.1.ff_out.weight"


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
  """A finished fast run (no evaluation) and its workdir."""
  wd = tmp_path_factory.mktemp("finished") / "run"
  assert launch.main(fast_argv(model_dir, wd)) == 0
  return wd


def _nan_copy(model_dir, dst):
  """A copy of the model (mtimes kept, as cp -p) with element 7 of NAN_TENSOR (float32) set to NaN in place: the
  file's size and header stay the same, only 4 bytes of tensor data change."""
  shutil.copytree(model_dir, dst)
  f = os.path.join(dst, "model.safetensors")
  with open(f, "r+b") as fh:
    n = int.from_bytes(fh.read(8), "little")
    info = json.loads(fh.read(n))[NAN_TENSOR]
    assert info["dtype"] == "F32"
    fh.seek(8 + n + info["data_offsets"][0] + 7 * 4)
    fh.write(np.float32(np.nan).tobytes())
  assert np.isnan(load_file(f)[NAN_TENSOR].flat[7])
  return str(dst)


def test_nan_in_a_copy_of_the_model_against_a_finished_workdir(finished, model_dir, tmp_path, capsys):
  wd = tmp_path / "run"
  shutil.copytree(finished, wd)
  bad = _nan_copy(model_dir, tmp_path / "nan-model")
  assert launch.main(fast_argv(bad, wd)) == 2
  err = capsys.readouterr().err
  assert NAN_TENSOR in err and "changed since" in err and "1 non-finite" in err and "--overwrite" in err
  # the same model run fresh (here: --overwrite) is refused when the tensor is read, naming it
  assert launch.main(fast_argv(bad, wd, "--overwrite")) == 2
  err = capsys.readouterr().err
  assert NAN_TENSOR in err and "non-finite" in err and "changed since" not in err
  assert not (wd / "checkpoint").exists()
  # the untouched model in the finished workdir: its digests were recorded, nothing is re-read
  wd2 = tmp_path / "run2"
  shutil.copytree(finished, wd2)
  assert launch.main(fast_argv(model_dir, wd2)) == 0
  rep = json.loads((wd2 / "report.json").read_text())
  assert rep["resume"]["reused_checkpoint"] and rep["resume"]["attempts"] == 2
  digests = json.loads((wd2 / "source_digests.json").read_text())["tensors"]
  assert len(digests) == rep["model"]["source_tensors_digested"] and NAN_TENSOR in digests


def test_a_damaged_checkpoint_in_a_finished_workdir_is_refused(finished, model_dir, tmp_path, capsys):
  wd = tmp_path / "run"
  shutil.copytree(finished, wd)
  files = [os.path.join(d, f) for d, _, fs in os.walk(wd / "checkpoint" / "arrays" / "blocks.1") for f in fs]
  big = max(files, key=os.path.getsize)
  data = bytearray(open(big, "rb").read())
  data[len(data) // 2] ^= 0x5A
  open(big, "wb").write(bytes(data))
  assert launch.main(fast_argv(model_dir, wd)) == 2
  err = capsys.readouterr().err
  assert os.path.relpath(big, wd / "checkpoint") in err and "(part blocks.1)" in err and "--overwrite" in err


def test_stale_temporary_dirs_are_removed_only_when_their_owner_is_gone(finished, model_dir, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(finished, wd)
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()  # an exited process: its pid names a killed writer
  host = socket.gethostname()
  dead = wd / f".checkpoint.tmp-p{p.pid}@{host}-x1"
  dead_state = wd / "state" / "blocks" / f".block-000001.tmp-p{p.pid}@{host}-x2"
  live = wd / f".checkpoint.tmp-p{os.getppid()}@{host}-x3"  # our parent process is alive
  legacy = wd / ".checkpoint.tmp-abc123"  # no recorded owner (older version)
  dead_file = wd / f".progress.json.tmp-p{p.pid}@{host}-x4"  # fileio.atomic_write_text's temporary file
  for d in (dead, dead_state, live, legacy):
    d.mkdir(parents=True)
    (d / "junk").write_text("x")
  dead_file.write_text("{")
  assert launch.main(fast_argv(model_dir, wd)) == 0
  assert not dead.exists() and not dead_state.exists() and not dead_file.exists()
  assert live.exists() and legacy.exists()
  assert launch.main(fast_argv(model_dir, wd, "--overwrite")) == 0
  assert not live.exists() and not legacy.exists()
  assert not [n for n in os.listdir(wd) if ".tmp-" in n or ".old-" in n]


@pytest.mark.parametrize("name,content,where,what", [
    ("c.jsonl", b'{"text": "a b c"}\n{"body": "d e f"}\n', "line 2", "no field 'text'"),
    ("c.jsonl", b'{"text": "a b c"}\n\n{"text": "d e\n', "line 3", "not valid JSON"),
    ("c.json", b'[{"text": "a"}, {"txt": "b"}]', "item 2", "no field 'text'"),
    ("c.txt", "line one\nline two caf\u00e9\n".encode("latin-1"), "line 2", "not UTF-8"),
    ("c.json.gz", b"this is not gzip data at all", "c.json.gz", "not a readable gzip file"),
])
def test_calibration_file_failures_name_file_line_and_fix(tmp_path, name, content, where, what):
  f = tmp_path / name
  f.write_bytes(content)
  with pytest.raises(ConfigError) as e:
    text_windows.read_text_files([str(f)])
  msg = str(e.value)
  assert str(f) in msg and where in msg and what in msg and "HF cache" not in msg
  assert "text_field" in msg or "iconv" in msg or "download it again" in msg


def test_gzipped_jsonl_is_read_line_by_line(tmp_path):
  import gzip
  f = tmp_path / "c.jsonl.gz"
  with gzip.open(f, "wb") as g:
    g.write(b'{"text": "first doc"}\n{"text": "second doc", "id": 2}\n')
  assert text_windows.read_text_files([str(f)]) == ["first doc", "second doc"]


def test_bad_calibration_file_exits_2_before_writing(model_dir, tmp_path, capsys):
  f = tmp_path / "calib.jsonl"
  f.write_text('{"text": "in the beginning"}\n{"content": "x"}\n')
  wd = tmp_path / "run"
  assert launch.main(fast_argv(model_dir, wd, f"--config.calib.source={f}")) == 2
  err = capsys.readouterr().err
  assert f"{f}, line 2" in err and "--config.calib.text_field" in err and not wd.exists()


def test_help_shows_both_forms_the_override_syntax_and_every_flag(capsys):
  with pytest.raises(SystemExit) as e:
    launch.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "--config CONFIG[:PRESETS] [--workdir DIR]" in out and "--dry_run [--config.KEY=VALUE" in out
  assert "--config.SECTION.KEY=VALUE" in out and "--config.calib.nsamples=64" in out and "docs/launch.md" in out
  for flag, text in (("--workdir", "output directory"), ("--dry_run", "print the plan"), ("--overwrite", "start over"),
                     ("--log_level", "verbosity"), ("--config", "config file")):
    assert flag in out and text in out
  assert "--kill_after_block" not in out  # testing only


def test_unknown_log_level_is_a_clear_error(capsys):
  with pytest.raises(SystemExit) as e:
    launch.main(["--config", "configs/tiny.py", "--log_level=VERBOSE"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "--log_level" in err and "'VERBOSE'" in err and "INFO" in err


@pytest.mark.slow
def test_kill_during_the_checkpoint_save_then_run_leaves_no_temporary_dir(model_dir, tmp_path):
  """kill -9 of the CLI while `.checkpoint.tmp-*` exists (the save in progress), then the same command again."""
  wd = tmp_path / "run"
  argv = [sys.executable, "-m", "qdllm_jax.launch", *fast_argv(model_dir, wd)]
  for _ in range(5):  # the tiny save is short: retry until the kill lands inside it
    shutil.rmtree(wd, ignore_errors=True)
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hit = False
    while p.poll() is None:
      if wd.is_dir() and any(n.startswith(".checkpoint.tmp-") for n in os.listdir(wd)):
        p.send_signal(signal.SIGKILL)
        hit = True
        break
      time.sleep(0.002)
    p.wait()
    if hit:
      break
  assert hit, "the save was never caught in progress"
  assert [n for n in os.listdir(wd) if n.startswith(".checkpoint.tmp-")] and not (wd / "checkpoint").exists()
  out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "left by a killed save" in out.stderr
  left = [os.path.join(d, n) for d, dirs, _ in os.walk(wd) for n in dirs if ".tmp-" in n or ".old-" in n]
  assert not left and (wd / "checkpoint" / "checksums.json").is_file()


def test_concurrent_writers_of_one_small_file_never_collide(tmp_path):
  """Two processes rewriting the same JSON file (as every host of a multi-host run once did with progress.json):
  each write is whole, none fails on a temporary name the other renamed away, and no temporary file is left."""
  target = tmp_path / "progress.json"
  code = ("import json, sys\nfrom qdllm_jax import fileio\n"
          "for i in range(300):\n  fileio.atomic_write_text(sys.argv[1], json.dumps({'w': sys.argv[2], 'i': i}))\n")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(target), w], stderr=subprocess.PIPE) for w in "ab"]
  errs = [p.communicate(timeout=120)[1].decode() for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs
  last = json.loads(target.read_text())
  assert last["i"] == 299 and last["w"] in "ab"
  assert os.listdir(tmp_path) == ["progress.json"]
