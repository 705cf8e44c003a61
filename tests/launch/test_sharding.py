"""Sharded calibration and evaluation on 8 simulated CPU devices equal the single-device results.

References: the single-device computation, and for the qkv Hessian a direct NumPy transcription of
H = (2/N) sum_s X_s^T X_s with X = RMSNorm(x) * w (float64).
"""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qdllm_jax import sharding
from qdllm_jax.calib import capture
from qdllm_jax.models import bert, transformer
from qdllm_jax.models.llada import LLADA_TINY_TEST, llada_config

CFG = llada_config(LLADA_TINY_TEST)  # d_model 32, 4 heads, mlp 64, vocab 128
MESHES = [((8,), ("data",)), ((2, 4), ("data", "model")), ((4, 2), ("data", "model"))]


def _mesh(shape, axes):
  assert len(jax.devices()) == 8, "tests/conftest.py must give 8 simulated CPU devices"
  return sharding.make_mesh(shape, axes)


@pytest.fixture(scope="module")
def params():
  return transformer.init_params(CFG, jax.random.key(3), std=0.2)


@pytest.mark.parametrize("shape,axes", MESHES)
def test_sharded_calibration_hessian_equals_single_device(params, shape, axes):
  n, length = 16, 8
  xs = np.random.default_rng(0).normal(size=(n, length, CFG.d_model)).astype(np.float32)
  blk = params["blocks"][0]
  ref = capture.capture_block(blk, xs, CFG, chunk_size=8)
  mesh = _mesh(shape, axes)
  xs_sh = sharding.shard_rows(xs, mesh)
  assert xs_sh.sharding.spec == P("data", None, None)
  assert len({d for s in xs_sh.addressable_shards for d in [s.device]}) == 8
  got = capture.capture_block(blk, xs_sh, CFG, chunk_size=8)
  for tap in transformer.LINEAR_GROUPS:
    np.testing.assert_allclose(np.asarray(got.hessians[tap]), np.asarray(ref.hessians[tap]), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got.outputs), np.asarray(ref.outputs), rtol=1e-5, atol=1e-6)
  x64 = xs.astype(np.float64)
  h = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + CFG.norm_eps) * np.asarray(blk["attn_norm"], np.float64)
  h_ref = 2.0 / n * np.einsum("slc,sld->cd", h, h)
  np.testing.assert_allclose(np.asarray(got.hessians["qkv"]), h_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,chunk,host_buffer", [(16, 8, None), (24, 8, False), (40, 16, None)])
def test_data_parallel_chunks_use_every_device(params, n, chunk, host_buffer, monkeypatch):
  """Every chunk step gets rows from all 8 row shards (the devices compute in parallel), including the last,
  overlapping chunk; Hessians and outputs equal a float64 NumPy reference of the same block."""
  from qdllm_jax.calib import capture as cap_lib
  xs = np.random.default_rng(1).normal(size=(n, 8, CFG.d_model)).astype(np.float32)
  mesh = _mesh((8, 1), ("data", "model"))
  xs_sh = sharding.shard_rows(xs, mesh)
  assert cap_lib.row_shards(xs_sh) == 8 and cap_lib.row_shards(xs) == 1
  seen = []
  real = cap_lib._chunk_step
  monkeypatch.setattr(cap_lib, "_chunk_step",
                      lambda p, x, *a: seen.append(len(x.sharding.device_set)) or real(p, x, *a))
  got = cap_lib.capture_block(params["blocks"][0], xs_sh, CFG, chunk_size=chunk, host_buffer=host_buffer)
  assert seen and all(d == 8 for d in seen), seen
  assert len(seen) == -(-n // 8 // max(1, chunk // 8))
  blk = params["blocks"][0]
  x64 = xs.astype(np.float64)
  h = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + CFG.norm_eps) * np.asarray(blk["attn_norm"], np.float64)
  np.testing.assert_allclose(np.asarray(got.hessians["qkv"]), 2.0 / n * np.einsum("slc,sld->cd", h, h),
                             rtol=1e-4, atol=1e-5)
  ref = cap_lib.capture_block(blk, xs, CFG, chunk_size=chunk)
  # float32 matmuls of 8 row shards vs one batch: XLA:CPU picks other kernels (seen here: 2.3e-6 on |x| ~ 0.03)
  np.testing.assert_allclose(np.asarray(got.outputs), np.asarray(ref.outputs), rtol=1e-5, atol=1e-5)
  for tap in transformer.LINEAR_GROUPS:  # float32 sums in another order
    np.testing.assert_allclose(np.asarray(got.hessians[tap]), np.asarray(ref.hessians[tap]), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("shape,axes", MESHES)
def test_sharded_eval_forward_equals_single_device(params, shape, axes):
  ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (8, 12)).astype(np.int32)
  ref = np.asarray(transformer.forward_jit(params, CFG, ids))
  mesh = _mesh(shape, axes)
  sharded = jax.device_put(params, sharding.param_shardings(params, mesh, transformer.PARAM_AXES))
  if "model" in axes:  # the logical rules put the MLP width and the vocabulary on the model axis
    assert sharded["blocks"][0]["gate"].sharding.spec == P("model", None)
    assert sharded["head"].sharding.spec == P("model", None)
  with jax.set_mesh(mesh):
    got = np.asarray(transformer.forward_jit(sharded, CFG, sharding.shard_rows(ids, mesh)))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_bert_params_shard_by_its_family_axes_and_compute_the_single_device_output():
  """BERT's own table: attention and MLP widths and the vocabulary over "model", positions replicated."""
  cfg = bert.FAMILY.parse_config({
      "model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32, "num_attention_heads": 4,
      "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 128, "max_position_embeddings": 64}, "c")
  shapes = bert.param_shapes(cfg)
  leaves, tdef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  rng = np.random.default_rng(4)
  params = jax.tree.unflatten(tdef, [rng.normal(0, 0.2, s).astype(np.float32) for s in leaves])
  ids = rng.integers(0, cfg.vocab_size, (8, 12)).astype(np.int32)
  ref = np.asarray(bert.forward(params, cfg, ids))
  mesh = _mesh((2, 4), ("data", "model"))
  sharded = jax.device_put(params, sharding.param_shardings(params, mesh, bert.FAMILY.param_axes))
  blk = sharded["blocks"][0]
  assert blk["k"].sharding.spec == P("model", None) and blk["k_bias"].sharding.spec == P("model")
  assert blk["down"].sharding.spec == P(None, "model") and blk["up_bias"].sharding.spec == P("model")
  assert sharded["embed"].sharding.spec == P("model", None) and sharded["pos_embed"].sharding.spec == P(None, None)
  with jax.set_mesh(mesh):
    got = np.asarray(jax.jit(bert.forward, static_argnums=1)(sharded, cfg, sharding.shard_rows(ids, mesh)))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_sharded_quantized_checkpoint_forward_equals_single_device(params, tmp_path):
  """A packed (RTN 4-bit) checkpoint loaded onto a (2, 4) mesh computes the unsharded logits."""
  from qdllm_jax import checkpoint
  from qdllm_jax.quant import api
  blocks = [{k: (api.quantize_weight(v, None, method="rtn", bits=4, group_size=32) if k in transformer.LINEARS else v)
             for k, v in b.items()} for b in params["blocks"]]
  path = checkpoint.save_quantized(str(tmp_path / "q"), dict(params, blocks=blocks), CFG)
  ids = np.random.default_rng(2).integers(0, CFG.vocab_size, (8, 12)).astype(np.int32)
  ref = np.asarray(checkpoint.load_quantized(path)(ids))
  mesh = _mesh((2, 4), ("data", "model"))
  model = checkpoint.load_quantized(path, mesh=mesh)
  with jax.set_mesh(mesh):
    got = np.asarray(model(sharding.shard_rows(ids, mesh)))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~1-3 min: compiles the sharded solvers for every matrix shape
@pytest.mark.parametrize("method,mesh_shape", [("gptq", (2, 4)), ("quant_dllm", (4, 2))])
def test_pipeline_solvers_split_over_rows_equal_single_device(params, method, mesh_shape, monkeypatch):
  """quantize_model with row_sharding=(mesh, "model") solves every matrix on all the model-axis devices and
  gives the single-device weights (GPTQ codes exactly; DAQ to float tolerance)."""
  from qdllm_jax.quant import pipeline, row_sharded, rules
  ids = np.random.default_rng(3).integers(3, CFG.vocab_size, (8, 16)).astype(np.int32)
  plan = rules.default_rules(method, 2, 32, **({"abmp_ratio": 0.25, "rsr_iters": 3} if method == "quant_dllm" else {}))
  ref, rep_ref = pipeline.quantize_model((params, CFG), ids, plan)
  mesh = _mesh(mesh_shape, ("data", "model"))
  calls = []
  for name in ("gptq_rows", "daq_rows"):
    real = getattr(row_sharded, name)
    monkeypatch.setattr(row_sharded, name, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
  got, rep = pipeline.quantize_model((params, CFG), ids, plan, row_sharding=(mesh, "model"))
  assert len(calls) == len(rep) == len(rep_ref) == CFG.n_layers * len(transformer.LINEARS)
  for b_ref, b_got in zip(ref["blocks"], got["blocks"]):
    for n in transformer.LINEARS:
      w_ref, w_got = np.asarray(b_ref[n].dequantize()), np.asarray(b_got[n].dequantize())
      if method == "gptq":
        np.testing.assert_array_equal(w_got, w_ref)
      else:
        np.testing.assert_allclose(w_got, w_ref, rtol=2e-3, atol=2e-3 * np.abs(w_ref).max())
  np.testing.assert_allclose([r["rel_err"] for r in rep], [r["rel_err"] for r in rep_ref], rtol=2e-3)


def test_host_activation_chunks_are_split_over_the_data_axis(params, monkeypatch):
  """Offloaded (NumPy) activations: with chunk_sharding each chunk lands split over the 8 data devices; the
  result equals the unsharded capture."""
  from qdllm_jax.calib import capture as cap_lib
  xs = np.random.default_rng(4).normal(size=(16, 8, CFG.d_model)).astype(np.float32)
  mesh = _mesh((8, 1), ("data", "model"))
  seen = []
  real = cap_lib._chunk_step
  monkeypatch.setattr(cap_lib, "_chunk_step",
                      lambda p, x, *a: seen.append(len(x.sharding.device_set)) or real(p, x, *a))
  got = cap_lib.capture_block(params["blocks"][0], xs, CFG, chunk_size=8,
                              chunk_sharding=sharding.named(mesh, ("batch", None, None)))
  assert seen == [8, 8] and isinstance(got.outputs, np.ndarray)
  ref = cap_lib.capture_block(params["blocks"][0], xs, CFG, chunk_size=8)
  np.testing.assert_allclose(got.outputs, ref.outputs, rtol=1e-5, atol=1e-6)
  for tap in transformer.LINEAR_GROUPS:
    np.testing.assert_allclose(np.asarray(got.hessians[tap]), np.asarray(ref.hessians[tap]), rtol=2e-5, atol=1e-5)
