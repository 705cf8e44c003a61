"""Failure modes of the checkpoint writers: nothing half-written is ever left behind, errors are clear.

Uses a dense tiny model (no quantizer compile) except where a packed leaf is the point.
"""
import errno
import os
import shutil

import jax
import numpy as np
import pytest
from ckpt_common import CFG

from qdllm_jax.checkpoint import load_quantized, save_quantized, store
from qdllm_jax.errors import CheckpointError, ConfigError
from qdllm_jax.models import transformer


@pytest.fixture(scope="module")
def dense_params():
  return jax.device_get(transformer.init_params(CFG, jax.random.key(1), std=0.2))


def _leftovers(parent):
  return sorted(n for n in os.listdir(parent) if n.startswith("."))


def test_parent_is_a_file(tmp_path, dense_params):
  (tmp_path / "file").write_text("x")
  with pytest.raises(CheckpointError, match="cannot create the parent directory|not a writable directory"):
    save_quantized(tmp_path / "file" / "ckpt", dense_params, CFG)
  assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent(tmp_path, dense_params):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    with pytest.raises(CheckpointError, match="not a writable directory"):
      save_quantized(ro / "ckpt", dense_params, CFG)
    assert os.listdir(ro) == []
  finally:
    ro.chmod(0o755)


def test_existing_target_needs_overwrite(tmp_path, dense_params):
  path = save_quantized(tmp_path / "c", dense_params, CFG, metadata={"run": 1})
  with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
    save_quantized(path, dense_params, CFG)
  save_quantized(path, dense_params, CFG, metadata={"run": 2}, overwrite=True)
  from qdllm_jax.checkpoint import read_sidecar
  assert read_sidecar(path)[0]["metadata"] == {"run": 2}
  assert _leftovers(tmp_path) == []


def test_disk_full_before_write(tmp_path, dense_params, monkeypatch):
  free = shutil.disk_usage(tmp_path)._replace(free=1000)
  monkeypatch.setattr(store.shutil, "disk_usage", lambda p: free)
  nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(dense_params))
  with pytest.raises(CheckpointError, match=r"has 1000 bytes free, the checkpoint needs about (\d+)") as e:
    save_quantized(tmp_path / "c", dense_params, CFG)
  assert int(e.value.args[0].split("needs about ")[1].split(";")[0]) >= nbytes
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_disk_full_during_write(tmp_path, dense_params, monkeypatch, overwrite):
  """ENOSPC after the arrays are on disk: no target, no temporary dir; an overwritten checkpoint survives."""
  path = tmp_path / "c"
  if overwrite:
    save_quantized(path, dense_params, CFG, metadata={"run": "old"})
  seen = []
  real = store.write_text

  def full(p, text):
    seen.append(sorted(os.listdir(os.path.dirname(p))))
    if p.endswith("qdllm_checkpoint.json"):
      raise OSError(errno.ENOSPC, "No space left on device", p)
    real(p, text)
  monkeypatch.setattr(store, "write_text", full)
  with pytest.raises(CheckpointError, match="disk under .* is full.*nothing was written"):
    save_quantized(path, dense_params, CFG, metadata={"run": "new"}, overwrite=overwrite)
  assert "arrays" in seen[-1]  # the failure came mid-write, after the Orbax arrays
  assert _leftovers(tmp_path) == []
  if overwrite:
    monkeypatch.undo()
    from qdllm_jax.checkpoint import read_sidecar
    assert read_sidecar(path)[0]["metadata"] == {"run": "old"}
    model = load_quantized(path)
    assert np.array_equal(model.params["embed"], dense_params["embed"])
  else:
    assert not os.path.exists(path)


def test_orbax_failure_is_wrapped(tmp_path, dense_params, monkeypatch):
  def boom(path, arrays):
    os.makedirs(path)
    raise ValueError("tensorstore write failed")
  monkeypatch.setattr(store, "save_tree", boom)
  with pytest.raises(CheckpointError, match="ValueError: tensorstore write failed.*nothing was written"):
    save_quantized(tmp_path / "c", dense_params, CFG)
  assert os.listdir(tmp_path) == []


def test_bad_inputs_refused_before_writing(tmp_path, dense_params, tokdir):
  with pytest.raises(ConfigError, match="metadata cannot be written as JSON"):
    save_quantized(tmp_path / "a", dense_params, CFG, metadata={"f": object()})
  wrong = dict(dense_params, blocks=dense_params["blocks"][:1])
  with pytest.raises(CheckpointError, match=r"missing \['blocks\.1\.attn_norm'"):
    save_quantized(tmp_path / "a", wrong, CFG)
  with pytest.raises(CheckpointError, match="is a str; a checkpoint holds arrays"):
    save_quantized(tmp_path / "a", dict(dense_params, embed="x"), CFG)
  with pytest.raises(CheckpointError, match="holds none of"):
    save_quantized(tmp_path / "a", dense_params, CFG, tokenizer_from=str(tmp_path))
  assert not os.path.exists(tmp_path / "a")
  out = save_quantized(tmp_path / "b", dense_params, CFG, tokenizer_from=str(tokdir))
  for f in ("tokenizer.json", "tokenizer_config.json"):
    assert open(os.path.join(out, f)).read() == open(os.path.join(tokdir, f)).read()


def test_load_errors(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    load_quantized(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="missing checkpoint sidecar"):
    load_quantized(tmp_path / "empty")
