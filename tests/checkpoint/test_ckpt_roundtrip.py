"""save_quantized / load_quantized, the exports and the size accounting on a mixed quantized tiny LLaDA.

References: the in-memory arrays (bitwise), the in-memory quantized model's logits, a dense model built from
NumPy `dequantize()` (einsum reference), the safetensors files opened directly (and through PyTorch), and
byte counts summed over the NumPy arrays.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ckpt_common import CFG
from safetensors import safe_open

from qdllm_jax.checkpoint import (
  checkpoint_nbytes,
  export_hf,
  export_packed_safetensors,
  load_packed_safetensors,
  load_quantized,
  save_quantized,
  size_summary,
)
from qdllm_jax.errors import CheckpointError, FormatError
from qdllm_jax.models import hf, load_pretrained
from qdllm_jax.models.model import Model
from qdllm_jax.quant.packed import QuantizedWeight
from qdllm_jax.sharding import make_mesh

IDS = np.random.default_rng(3).integers(0, 120, (2, 16)).astype(np.int32)  # 32 tokens: the prefill kernel path
is_qw = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731


def assert_bitwise_equal(a, b):
  """Same tree structure (incl. every QuantizedWeight's static metadata) and identical bytes in every array."""
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _dense_reference(params):
  """Every packed weight replaced by its dequantized float32 matrix."""
  return jax.tree.map(lambda v: jnp.asarray(v.dequantize(jnp.float32)) if is_qw(v) else v, params, is_leaf=is_qw)


@pytest.fixture(scope="module")
def saved(qparams, tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpt")
  tok = root / "tok"
  tok.mkdir()
  (tok / "tokenizer.json").write_text('{"version": "1.0"}')
  (tok / "special_tokens_map.json").write_text("{}")
  meta = {"rules": [[".*", "mixed"]], "fingerprint": "abc", "report": {"mean_rel_err": 0.1}}
  return save_quantized(root / "q", qparams, CFG, metadata=meta, tokenizer_from=str(tok)), meta


def test_layout_and_sidecar(saved, qparams):
  path, meta = saved
  assert set(os.listdir(path)) == {"arrays", "config.json", "qdllm_checkpoint.json", "tokenizer.json",
                                   "special_tokens_map.json", "checksums.json"}
  assert not [n for n in os.listdir(os.path.dirname(path)) if ".tmp-" in n]
  side = json.load(open(os.path.join(path, "qdllm_checkpoint.json")))
  assert side["metadata"] == meta and side["tokenizer"]["files"] == ["tokenizer.json", "special_tokens_map.json"]
  assert json.load(open(os.path.join(path, "config.json")))["d_model"] == CFG.d_model
  q = side["tree"]["items"]["blocks"]["items"][0]["items"]["q"]
  want = qparams["blocks"][0]["q"]
  assert q["meta"] == {"shape": list(want.shape), "method": want.method, "format": "binary_planes", "bits": 2,
                       "group_size": 32, "sym": False, "scale_dtype": "float16", "layout_version": 2}
  assert q["arrays"]["planes"] == {"shape": list(want.planes.shape), "dtype": "uint32"}
  assert side["tree"]["items"]["blocks"]["items"][1]["items"]["down"]["kind"] == "array"
  # one Orbax tree per part, so a save or a read holds one part at a time
  parts = [k for k in qparams if k != "blocks"] + [f"blocks.{i}" for i in range(CFG.n_layers)]
  assert sorted(side["parts"]) == sorted(parts) and sorted(os.listdir(os.path.join(path, "arrays"))) == sorted(parts)


def test_lazy_top_params_save_the_same_checkpoint(qparams, tmp_path):
  """Top params given as LazyTensors of a safetensors checkpoint (read while their part is written) give the
  same content as the loaded arrays."""
  from qdllm_jax.models.hf_checkpoint import open_checkpoint, save_pretrained
  from qdllm_jax.workdir import content_digest
  top = {k: v for k, v in qparams.items() if k != "blocks"}
  dense_blocks = [{k: np.asarray(v.dequantize(jnp.float32)) if is_qw(v) else np.asarray(v) for k, v in b.items()}
                  for b in qparams["blocks"]]
  save_pretrained(dict(top, blocks=dense_blocks), CFG, tmp_path / "src")
  reader = open_checkpoint(str(tmp_path / "src"))
  lazy = reader.lazy_top()
  assert {k: v.spec()["shape"] for k, v in lazy.items()} == {k: list(np.shape(v)) for k, v in top.items()}
  a = save_quantized(tmp_path / "lazy", dict(lazy, blocks=qparams["blocks"]), CFG)
  b = save_quantized(tmp_path / "eager", dict(reader.top(numpy=True), blocks=qparams["blocks"]), CFG)
  assert content_digest(a) == content_digest(b)


def test_round_trip_bit_exact_and_logits(saved, qparams):
  path, _ = saved
  model = load_quantized(path)
  assert model.config == CFG
  assert_bitwise_equal(model.params, qparams)
  blk = model.params["blocks"][0]
  assert {blk[n].format for n in ("q", "k")} == {"binary_planes"} and blk["v"].g_idx is not None
  assert blk["o"].sym and blk["o"].zeros is None and blk["gate"].scales.dtype == jnp.bfloat16
  assert isinstance(blk["down"], jax.Array)
  got = np.asarray(model(IDS))
  np.testing.assert_array_equal(got, np.asarray(Model(params=qparams, config=CFG)(IDS)))
  ref = np.asarray(Model(params=_dense_reference(qparams), config=CFG)(IDS))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_relative_paths(qparams, tmp_path, monkeypatch):
  """A workdir given relative to the current directory (the README's `--workdir runs/tiny`) saves and restores:
  Orbax needs absolute paths, the store makes them so."""
  monkeypatch.chdir(tmp_path)
  path = save_quantized("rel/q", qparams, CFG)
  assert_bitwise_equal(load_quantized("rel/q").params, qparams)
  assert os.path.isdir(tmp_path / "rel" / "q" / "arrays") and path


def test_generation_from_restored_packed_model(saved, qparams):
  from qdllm_jax.sampling.llada_sampler import llada_generate
  model = load_quantized(saved[0])
  prompt = jnp.asarray(IDS[:1, :8])
  kw = dict(mask_id=CFG.mask_id, steps=4, gen_length=24, block_length=24)
  out = np.asarray(llada_generate(model, prompt, **kw))
  ref = np.asarray(llada_generate(Model(params=_dense_reference(qparams), config=CFG), prompt, **kw))
  assert out.shape == (1, 32) and np.array_equal(out[:, :8], IDS[:1, :8])
  assert (out[:, 8:] != CFG.mask_id).all()
  np.testing.assert_array_equal(out, ref)


def test_load_onto_mesh(saved, qparams):
  mesh = make_mesh((2, 4), ("data", "model"))
  model = load_quantized(saved[0], mesh=mesh)
  assert_bitwise_equal(jax.device_get(model.params), qparams)
  blk = model.params["blocks"][0]
  P = jax.sharding.PartitionSpec
  assert blk["q"].planes.sharding.spec == P(None, "model", None)      # out = 32 rows over 4 devices
  assert blk["q"].a_r.sharding.spec == P(None, "model")
  assert blk["q"].a_c.sharding.spec == P(None, None) and blk["q"].orders.sharding.spec == P(None)
  assert blk["gate"].qweight.sharding.spec == P("model", None) and blk["gate"].scales.sharding.spec == P("model", None)
  assert blk["v"].g_idx.sharding.spec == P(None)
  assert model.params["embed"].sharding.spec == P("model", None) and blk["down"].sharding.spec == P(None, "model")
  np.testing.assert_allclose(np.asarray(model(IDS)), np.asarray(Model(params=qparams, config=CFG)(IDS)),
                             rtol=1e-5, atol=1e-5)


def test_packed_safetensors_round_trip(saved, qparams, tmp_path):
  out = export_packed_safetensors(saved[0], tmp_path / "packed")
  assert {"model.safetensors", "quantization_config.json", "config.json", "tokenizer.json"} <= set(os.listdir(out))
  q = qparams["blocks"][0]["q"]
  with safe_open(os.path.join(out, "model.safetensors"), framework="np") as f:
    header = json.loads(f.metadata()["qdllm_quantization"])
    np.testing.assert_array_equal(f.get_tensor("model.transformer.blocks.0.q_proj.weight.planes"), q.planes)
    np.testing.assert_array_equal(f.get_tensor("model.transformer.blocks.1.ff_out.weight"),
                                  qparams["blocks"][1]["down"])
    assert "model.transformer.blocks.0.attn_out.weight.zeros" not in f.keys()  # sym: no zeros stored
    assert f.get_tensor("model.transformer.blocks.0.up_proj.weight.qweight").dtype == np.uint32
  assert header["layout_version"] == 2
  assert header["weights"]["model.transformer.blocks.0.q_proj.weight"]["fields"] == sorted(
      ["planes", "a_r", "a_c", "orders", "plane_block"])
  assert header["weights"]["model.transformer.blocks.0.v_proj.weight"]["format"] == "uniform"
  qc = json.load(open(os.path.join(out, "quantization_config.json")))
  assert qc["weights"] == header["weights"] and qc["metadata"]["fingerprint"] == "abc"
  assert_bitwise_equal(load_packed_safetensors(out).params, qparams)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_export_equals_dequantize(saved, qparams, tmp_path, dtype):
  out = export_hf(saved[0], tmp_path / "hf", dtype=dtype)
  model = load_pretrained(out)
  dt = jnp.dtype(dtype)
  for b, blk in enumerate(qparams["blocks"]):
    for n, v in blk.items():
      want = np.asarray(v.dequantize(jnp.float32) if is_qw(v) else v).astype(dt)
      got = np.asarray(model.params["blocks"][b][n])
      assert got.dtype == dt and got.tobytes() == want.tobytes(), (b, n)
  assert np.asarray(model.params["embed"]).tobytes() == np.asarray(qparams["embed"]).astype(dt).tobytes()
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == dtype
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))
  if dtype == "bfloat16":  # what a PyTorch user reads
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    t = load_file(os.path.join(out, "model.safetensors"))[hf.block_names(CFG, 0)["q"]]
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), np.asarray(qparams["blocks"][0]["q"].dequantize(jnp.bfloat16),
                                                                np.float32))


def test_exports_refuse_the_source(saved):
  for fn in (export_hf, export_packed_safetensors):
    with pytest.raises(CheckpointError, match="never modified"):
      fn(saved[0], saved[0])
    with pytest.raises(CheckpointError, match="never modified"):
      fn(saved[0], os.path.join(saved[0], "sub"))
  assert sorted(os.listdir(saved[0])) == sorted(["arrays", "config.json", "qdllm_checkpoint.json", "tokenizer.json",
                                                 "special_tokens_map.json", "checksums.json"])


def test_sizes_match_the_arrays(saved, qparams):
  path, _ = saved
  q_bytes = q_params = d_bytes = d_params = 0
  for leaf in jax.tree.leaves(qparams, is_leaf=is_qw):
    if is_qw(leaf):
      arrays = [np.asarray(getattr(leaf, f)) for f in leaf.ARRAY_FIELDS if getattr(leaf, f) is not None]
      q_bytes += sum(a.nbytes for a in arrays)
      q_params += leaf.shape[0] * leaf.shape[1]
    else:
      d_bytes += np.asarray(leaf).nbytes
      d_params += np.asarray(leaf).size
  assert checkpoint_nbytes(path) == q_bytes + d_bytes
  s = size_summary(path)
  assert (s["quantized_bytes"], s["quantized_params"], s["dense_bytes"], s["dense_params"]) == (
      q_bytes, q_params, d_bytes, d_params)
  assert s["true_bits_per_weight"] == pytest.approx(8 * q_bytes / q_params, rel=1e-12)
  assert s["model_bits_per_weight"] == pytest.approx(8 * (q_bytes + d_bytes) / (q_params + d_params), rel=1e-12)
  assert s["total_params"] == sum(int(np.prod(s_)) for s_ in jax.tree.leaves(
      jax.tree.map(lambda v: v.shape, qparams, is_leaf=is_qw), is_leaf=lambda x: isinstance(x, tuple)))
  assert size_summary(qparams) == s


def _edit_sidecar(path, fn):
  side_file = os.path.join(path, "qdllm_checkpoint.json")
  side = json.load(open(side_file))
  fn(side)
  json.dump(side, open(side_file, "w"))


def test_unknown_layout_version_refused(saved, qparams, tmp_path):
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(saved[0], copy)
  _edit_sidecar(copy, lambda s: s["tree"]["items"]["blocks"]["items"][1]["items"]["k"]["meta"].update(
      layout_version=3))
  with pytest.raises(FormatError, match=r"blocks\.1\.k has layout_version=3.*reads layout version 2"):
    load_quantized(copy)
  bad = dict(qparams, blocks=[dict(b) for b in qparams["blocks"]])
  bad["blocks"][0]["q"] = dataclasses.replace(bad["blocks"][0]["q"], layout_version=7)
  with pytest.raises(FormatError, match="layout_version=7 .* is not readable"):
    save_quantized(tmp_path / "never", bad, CFG)
  assert not os.path.exists(tmp_path / "never")
  # the packed safetensors export checks its header the same way
  out = export_packed_safetensors(saved[0], tmp_path / "packed")
  from safetensors.numpy import load_file, save_file
  file = os.path.join(out, "model.safetensors")
  with safe_open(file, framework="np") as f:
    header = f.metadata()
  doc = json.loads(header["qdllm_quantization"])
  doc["layout_version"] = 3
  save_file(load_file(file), file, metadata=dict(header, qdllm_quantization=json.dumps(doc)))
  with pytest.raises(FormatError, match="layout_version=3"):
    load_packed_safetensors(out)


def test_corrupt_arrays_detected(saved, tmp_path):
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(saved[0], copy)
  _edit_sidecar(copy, lambda s: s["tree"]["items"]["blocks"]["items"][0]["items"]["q"]["arrays"]["a_r"].update(
      dtype="float32"))
  with pytest.raises((CheckpointError, FormatError)):
    load_quantized(copy)
  with pytest.raises(CheckpointError, match="differ"):
    checkpoint_nbytes(copy)
