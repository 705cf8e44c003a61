"""Checksums of quantized checkpoints (checkpoint/integrity.py): what is recorded, and that a checkpoint whose
bytes changed after the save is refused by `load_quantized` and `python -m qdllm_jax.checkpoint verify`.

References: sha256 recomputed here with hashlib over the in-memory arrays and the files on disk; corruption is
made by flipping bytes of one Orbax data file (size unchanged), as a bad disk or copy would.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from ckpt_common import CFG

from qdllm_jax.checkpoint import integrity, load_quantized, save_quantized, verify
from qdllm_jax.checkpoint.__main__ import main as ckpt_main
from qdllm_jax.errors import CheckpointError
from qdllm_jax.quant.packed import QuantizedWeight


@pytest.fixture(scope="module")
def saved(qparams, tmp_path_factory):
  return save_quantized(tmp_path_factory.mktemp("integrity") / "q", qparams, CFG)


def _sha(a) -> str:
  a = np.ascontiguousarray(np.asarray(a))
  return hashlib.sha256(f"{a.dtype.name}|{a.shape}|".encode() + a.tobytes()).hexdigest()


def _flip_data_file(path: str, part: str = "blocks.0", n: int = 64) -> str:
  """Invert n bytes in the middle of the largest file of one part (size unchanged); returns the file."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, "arrays", part)) for f in fs]
  big = max(files, key=os.path.getsize)
  b = bytearray(open(big, "rb").read())
  mid = len(b) // 2
  b[mid:mid + n] = bytes(x ^ 0xFF for x in b[mid:mid + n])
  open(big, "wb").write(b)
  return big


def test_sidecar_digests_are_the_sha256_of_the_arrays_and_files(saved, qparams):
  side = json.load(open(os.path.join(saved, "qdllm_checkpoint.json")))
  blk = qparams["blocks"][1]
  d = side["digests"]["blocks.1"]
  assert d["blocks.1.down"] == _sha(blk["down"])  # a dense leaf
  qw = blk["q"]
  assert isinstance(qw, QuantizedWeight)
  for f in ("planes", "a_r", "a_c", "orders", "plane_block"):
    assert d[f"blocks.1.q.{f}"] == _sha(getattr(qw, f))
  assert side["digests"]["embed"] == {"embed": _sha(qparams["embed"])}
  man = json.load(open(os.path.join(saved, "checksums.json")))
  on_disk = sorted(os.path.relpath(os.path.join(r, f), saved) for r, _, fs in os.walk(saved) for f in fs)
  assert sorted(man["files"]) == [p for p in on_disk if p != "checksums.json"]
  for rel in ("qdllm_checkpoint.json", "config.json"):
    data = open(os.path.join(saved, rel), "rb").read()
    assert man["files"][rel] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
  r = verify(saved)
  assert r["files"] == len(man["files"]) and r["arrays"] == sum(len(v) for v in side["digests"].values())


def test_flipped_bytes_in_one_data_file_are_refused(saved, tmp_path, capsys):
  bad = str(tmp_path / "bad")
  shutil.copytree(saved, bad)
  f = _flip_data_file(bad)
  with pytest.raises(CheckpointError) as e:
    load_quantized(bad)
  msg = str(e.value)
  assert os.path.relpath(f, bad) in msg and "(part blocks.0)" in msg and "verify=False" in msg
  assert ckpt_main(["verify", bad]) == 2 and os.path.relpath(f, bad) in capsys.readouterr().err
  assert ckpt_main(["verify", saved]) == 0 and "ok" in capsys.readouterr().out


def test_an_array_that_disagrees_with_its_recorded_digest_is_named(saved, tmp_path):
  """The second layer: files consistent with checksums.json, but one array's sidecar digest differs."""
  bad = str(tmp_path / "bad")
  shutil.copytree(saved, bad)
  side_path = os.path.join(bad, "qdllm_checkpoint.json")
  side = json.load(open(side_path))
  side["digests"]["blocks.0"]["blocks.0.v.scales"] = "0" * 64
  open(side_path, "w").write(json.dumps(side))
  open(os.path.join(bad, "checksums.json"), "w").write(json.dumps(integrity.manifest_json(bad)))
  with pytest.raises(CheckpointError, match=r"blocks\.0\.v\.scales does not match its checksum"):
    load_quantized(bad)


def test_missing_manifest_names_the_fix_and_verify_false_skips(saved, tmp_path):
  bad = str(tmp_path / "old")
  shutil.copytree(saved, bad)
  os.remove(os.path.join(bad, "checksums.json"))
  with pytest.raises(CheckpointError, match="no checksums.json.*verify=False"):
    load_quantized(bad)
  m = load_quantized(bad, verify=False)
  assert m.params["blocks"][0]["q"].planes.shape == load_quantized(saved).params["blocks"][0]["q"].planes.shape


def test_failed_loads_leave_no_event_loop_noise(saved, tmp_path):
  """Loads of a checkpoint with a truncated OCDBT manifest or missing data files, host and sharded, even with
  verify=False, are refused before Orbax reads them, and nothing is written to stderr by them or by the next loads
  in the same process. (Before, TensorStore's read callbacks of the failed restore fired on Orbax's closed event
  loop: dozens of "RuntimeError: Event loop is closed" tracebacks.)"""
  bad1, bad2 = tmp_path / "b1", tmp_path / "b2"
  shutil.copytree(saved, bad1)
  shutil.copytree(saved, bad2)
  open(bad1 / "arrays" / "blocks.0" / "manifest.ocdbt", "wb").write(b"\0" * 64)
  for d, _, fs in os.walk(bad2 / "arrays" / "blocks.1" / "ocdbt.process_0"):
    for f in fs:
      os.remove(os.path.join(d, f))
  code = f"""
import jax
from qdllm_jax.checkpoint import load_quantized
from qdllm_jax.errors import CheckpointError
from qdllm_jax.sharding import make_mesh
mesh = make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
for p in [{str(bad1)!r}, {str(bad2)!r}]:
  for m in (None, mesh):
    try:
      load_quantized(p, mesh=m, verify=False)
    except CheckpointError:
      continue
    raise SystemExit("loaded " + p)
load_quantized({saved!r}, mesh=mesh)
load_quantized({saved!r})
print("ok")
"""
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
  assert "Event loop is closed" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_a_spilled_block_whose_array_changed_is_refused(tmp_path, qparams):
  """Finished blocks wait in the state directory; one whose bytes changed there must not reach the checkpoint."""
  from qdllm_jax.checkpoint import save_state, spill
  from qdllm_jax.quant.pipeline import PipelineState
  st = PipelineState(next_block=1, x=np.zeros((2, 4, 8), np.float32), blocks=[qparams["blocks"][0]], report=[],
                     orders=None, global_bits=None)
  d = tmp_path / "state"
  save_state(d, st, fingerprint="fp")
  blk = spill(d, st, fingerprint="fp").blocks[0]
  meta_path = os.path.join(blk.path, "block.json")
  meta = json.load(open(meta_path))
  assert meta["digests"]["v.qweight"] == _sha(qparams["blocks"][0]["v"].qweight)
  np.testing.assert_array_equal(blk.load()["v"].qweight, np.asarray(qparams["blocks"][0]["v"].qweight))
  meta["digests"]["v.qweight"] = "f" * 64
  open(meta_path, "w").write(json.dumps(meta))
  with pytest.raises(CheckpointError, match=r"spilled block 0 array v\.qweight does not match its checksum"):
    blk.load()
