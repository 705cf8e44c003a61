"""A multi-host run: two processes (jax.distributed over gloo on CPU, one device each) run the launch with the
data axis spanning them, and write the same checkpoint, bit for bit, as one process with two devices.

Reference: the single-process run of the same config on a (2, 1) mesh of simulated devices (its content digest).
"""
import json
import os
import socket
import subprocess
import sys

import pytest
from launch_common import ROOT, fast_argv

from qdllm_jax import launch

MESH = "--config.mesh.shape=(2,1)"


def _argv(model_dir, wd, *extra):
  return [a for a in fast_argv(model_dir, wd, MESH, *extra) if a != "--config.mesh.shape=(1,1)"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_write_the_single_process_checkpoint(model_dir, tmp_path):
  multi = tmp_path / "multi"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_NUM_PROCESSES="2",
             JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  cmd = [sys.executable, "-m", "qdllm_jax.launch", *_argv(model_dir, multi, "--config.distributed=True")]
  procs = [subprocess.Popen(cmd, env=dict(env, JAX_PROCESS_ID=str(i)), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  try:
    outs = [p.communicate(timeout=400)[0].decode() for p in procs]
  finally:
    for p in procs:
      p.kill()
  logs = "\n".join(f"--- process {i} ---\n" + o[-6000:] for i, o in enumerate(outs))
  assert [p.returncode for p in procs] == [0, 0], logs
  assert "3/6 quantize] block 2/2 done" in outs[1]  # process 1 quantized too (SPMD), process 0 wrote the outputs
  single = tmp_path / "single"
  assert launch.main(_argv(model_dir, single)) == 0
  got, want = (json.loads((d / "report.json").read_text()) for d in (multi, single))
  assert got["devices"].startswith("2 x ") and got["mesh"] == want["mesh"] == {"data": 2, "model": 1}
  assert got["sizes"]["checkpoint_sha256"] == want["sizes"]["checkpoint_sha256"]
  assert not (multi / "state").exists()


@pytest.mark.parametrize("seen", [[0, 0], [1, 1], [0, 1]])
def test_hosts_must_resume_from_the_same_state(seen, monkeypatch):
  """A pod whose hosts do not share the workdir would resume from different blocks and hang in the first
  collective: refused with a message naming the fix instead (process_allgather stubbed)."""
  from jax.experimental import multihost_utils

  from qdllm_jax import multihost
  from qdllm_jax.errors import ConfigError
  monkeypatch.setattr(multihost.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: [[s] for s in seen])
  if seen[0] == seen[1]:
    multihost.same_on_every_host(seen[0], "/wd/state")
  else:
    with pytest.raises(ConfigError, match="filesystem every host sees"):
      multihost.same_on_every_host(seen[0], "/wd/state")
