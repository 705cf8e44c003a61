"""Planning: packed sizes, per-device param bytes, and the dry run of LLaDA-8B on a TPU v5e-8 without weights.

References: `QuantizedWeight.nbytes` of real packed weights; the bytes actually placed on a device by
`jax.device_put` with the logical shardings; the LLaDA-8B parameter count from its published shapes
(GSAI-ML/LLaDA-8B-Base config.json) and the activation size N L D b from the paper's calibration setting.
"""
import re
import time

import jax
import numpy as np
import pytest

from qdllm_jax import hardware, launch, plan_timing, sharding
from qdllm_jax import plan as plan_lib
from qdllm_jax.models import bert, families, hf_checkpoint
from qdllm_jax.models.llada import LLADA_TINY_TEST, llada_config
from qdllm_jax.quant import api

GiB = 2 ** 30


@pytest.mark.parametrize("method,bits,group,opts", [
    ("quant_dllm", 2, 64, dict(abmp_ratio=0.5)), ("quant_dllm", 3, 32, {}), ("quant_dllm", 1, 128, {}),
    ("gptq", 3, 64, {}), ("gptq", 2, 128, dict(sym=True)), ("gptq", 4, 32, dict(act_order=True)),
    ("rtn", 4, -1, {}), ("rtn", 3, 64, dict(scale_dtype="float32"))])
def test_linear_bytes_equals_the_packed_weight(method, bits, group, opts):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 256)).astype(np.float32)
  x = rng.normal(size=(512, 256)).astype(np.float32)
  qw = api.quantize_weight(w, 2 * x.T @ x / 512, method=method, bits=bits, group_size=group, rsr_iters=1, **opts) \
      if method == "quant_dllm" else api.quantize_weight(w, 2 * x.T @ x / 512, method=method, bits=bits,
                                                         group_size=group, **opts)
  assert plan_lib.linear_bytes(16, 256, method, bits, group, opts.get("scale_dtype", "float16"),
                               opts.get("sym", False), opts.get("act_order", False)) == qw.nbytes


# a BERT with the MLM head (every BERT param name), widths that the model axis divides
TINY_BERT = bert.FAMILY.parse_config({
    "model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32, "num_attention_heads": 4,
    "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 128, "max_position_embeddings": 64}, "config.json")


@pytest.mark.parametrize("cfg", [llada_config(LLADA_TINY_TEST), TINY_BERT], ids=["llada", "bert"])
@pytest.mark.parametrize("axes", [{"data": 8}, {"data": 2, "model": 4}, {"data": 4, "model": 2}])
def test_param_bytes_per_device_equals_the_placed_shards(cfg, axes):
  shapes = families.param_shapes(cfg)
  params = jax.tree.map(lambda s: np.zeros(s, np.float32), shapes, is_leaf=lambda s: isinstance(s, tuple))
  mesh = sharding.make_mesh(tuple(axes.values()), tuple(axes))
  placed = jax.device_put(params, sharding.param_shardings(params, mesh, families.family_of(cfg).param_axes))
  dev0 = jax.devices()[0]
  on_dev0 = sum(s.data.nbytes for leaf in jax.tree.leaves(placed) for s in leaf.addressable_shards if s.device == dev0)
  assert plan_lib.param_bytes_per_device(cfg, 4, axes) == on_dev0


def _no_weights(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("the dry run read the checkpoint")
  monkeypatch.setattr(hf_checkpoint, "open_checkpoint", refuse)
  monkeypatch.setattr(hf_checkpoint, "safe_open", refuse)


def test_dry_run_llada8b_on_tpu_v5e_8_prints_a_plan_without_loading(monkeypatch, capsys, tmp_path):
  _no_weights(monkeypatch)
  monkeypatch.chdir(tmp_path)  # nothing may be written either
  rc = launch.main(["--config", f"{plan_lib.__file__.rsplit('/qdllm_jax/', 1)[0]}/configs/llada8b.py", "--dry_run",
                    "--config.plan.hardware=tpu_v5e_8", "--config.calib.chunk_size=2"])
  out = capsys.readouterr().out
  assert rc == 0 and list(tmp_path.iterdir()) == []
  v, d, f, n_layers = 126464, 4096, 12288, 32
  n_params = 2 * v * d + n_layers * (4 * d * d + 3 * d * f + 2 * d) + d  # 8.016 B (published: 8.02 B)
  assert f"{n_params / 1e9:.3f} B params" in out and "DRY RUN (no weights read)" in out
  assert "tpu_v5e_8" in out and "8 devices x 16 GiB" in out
  assert "224 of 224 block linears quantized" in out
  assert "model.transformer.blocks.*.ff_out -> quant_dllm w2 g128 abmp_ratio=0.05" in out
  assert "\nFITS" in out
  # no figure was measured on a TPU: the plan prints no duration for it, and says so
  line = next(ln for ln in out.splitlines() if ln.startswith("estimated duration"))
  assert "not measured on this hardware (tpu_v5e_8)" in line and not re.search(r"\d+m\d\ds|\d+h\d\dm", line)
  from qdllm_jax import config_check as config_lib
  spec = config_lib.validate(launch.load_config(f"{plan_lib.__file__.rsplit('/qdllm_jax/', 1)[0]}/configs/llada8b.py",
                                                [("plan.hardware", "tpu_v5e_8"), ("calib.chunk_size", "2")]),
                             dry_run=True)
  _, rp = plan_lib.dry_run(spec)
  n_dev = rp.mesh["data"] * rp.mesh.get("model", 1)
  act = 2 * 128 * 4096 * d * 2  # inputs + outputs, bf16: 8 GiB
  assert n_dev == 8 and rp.fits and not rp.offload
  assert rp.device["calibration activations"] == act // rp.mesh["data"]
  assert rp.device["Hessian + factors (f32)"] == 4 * f * f * 4
  assert rp.predicted["fp_bytes"] == 2 * n_params
  assert rp.estimate_s is None and rp.to_dict()["estimate_s"] is None


def test_dry_run_minilm_plans_the_bert_shapes(monkeypatch, capsys, tmp_path):
  """The README's BERT config plans from its config.json and safetensors headers: the parameter count from
  MiniLM's published shapes (d 384, 6 blocks, F 1536, vocabulary 30522, 512 positions, 2 token types; every
  linear biased)."""
  pytest.importorskip(bert.MINILM_PACKAGE, reason=f"needs `{bert.MINILM_INSTALL}`")
  monkeypatch.setattr(hf_checkpoint, "load_pretrained", lambda *a, **k: pytest.fail("the dry run loaded weights"))
  monkeypatch.chdir(tmp_path)
  rc = launch.main(["--config", f"{plan_lib.__file__.rsplit('/qdllm_jax/', 1)[0]}/configs/minilm.py", "--dry_run",
                    "--config.plan.hardware=tpu_v5e_8"])
  out = capsys.readouterr().out
  assert rc == 0 and list(tmp_path.iterdir()) == []
  v, d, f, n_layers = 30522, 384, 1536, 6
  embeddings = (v + 512 + 2) * d + 2 * d
  block = 4 * (d * d + d) + (f * d + f) + (d * f + d) + 4 * d
  assert f"{(embeddings + n_layers * block) / 1e9:.3f} B params" in out  # 0.023 B
  assert "bert, 6 blocks, d_model 384, mlp 1536" in out and "36 of 36 block linears quantized" in out
  assert "encoder.layer.*.intermediate.dense -> quant_dllm w2 g128" in out and "\nFITS" in out
  _, rp = plan_lib.dry_run(_spec("minilm.py", ("plan.hardware", "tpu_v5e_8")))
  assert rp.mesh == {"data": 8, "model": 1}
  # FP eval: float32 params (replicated) + the fidelity batch (64 sentences x 64 tokens over 8 data shards) of
  # hidden states [B, T, D] (no MLM head) and attention scores [B, H, T, T], float32
  assert rp.device["evaluation, FP model"] == 4 * (embeddings + n_layers * block) + 8 * 64 * (d * 4 + 12 * 64 * 4)


def _spec(config, *overrides):
  from qdllm_jax import config_check as config_lib
  root = plan_lib.__file__.rsplit("/qdllm_jax/", 1)[0]
  return config_lib.validate(launch.load_config(f"{root}/configs/{config}", list(overrides)), dry_run=True)


def test_a_measured_figure_table_entry_gives_durations_counted_by_hand(monkeypatch):
  """A (made-up) measured figure for tpu_v5e_8, LLaDA-8B Quant-dLLM W2: per block 7 solves (4 of 4096x4096 at
  1 s, 2 of 12288x4096 at 3 s, 1 of 4096x12288 at 3 s) and 4 factorisations (3 taps at width 4096: 1 s each,
  ff_out's 12288: 27 s); 32 blocks: 32 x (13 + 30) = 1376 s, split over the mesh's model axis of 2 (rows);
  calibration 800-1600 s over its data axis of 4 (chunks)."""
  from qdllm_jax import config_check as config_lib
  spec = _spec("llada8b.py", ("plan.hardware", "tpu_v5e_8"), ("calib.chunk_size", "2"))
  cfg = families.preset("llada_8b")
  rules_plan = config_lib.check_model(spec, cfg)
  factors, solves = plan_timing.workload(cfg, rules_plan)
  assert factors == {"inverse": {4096: 3 * 32, 12288: 32}} and sorted(solves.values()) == [32, 64, 128]
  fig = plan_timing.KernelTimes(factor={(k, c): ((c / 4096) ** 3,) * 2 for k, per in factors.items() for c in per},
                                solve={key: ((key[4] * key[5]) / 4096 ** 2,) * 2 for key in solves},
                                calibration=(800.0, 1600.0), source="test figure")
  monkeypatch.setitem(plan_timing.MEASURED, "tpu_v5e_8", fig)
  hw_name, hw = hardware.get_hardware(spec)
  rp = plan_lib.make_plan(spec, cfg, rules_plan, itemsize=2, hw_name=hw_name, hw=hw)
  assert rp.mesh == {"data": 4, "model": 2}
  assert rp.estimate_s["solvers"] == pytest.approx((688.0, 688.0))
  assert rp.estimate_s["calibration"] == pytest.approx((200.0, 400.0))
  assert "solvers 11m28s-11m28s" in rp.text() and "[test figure]" in rp.text()


def test_local_plan_solver_estimate_is_within_3x_of_the_measured_solves():
  """The tiny LLaDA with GPTQ W3 g64: the planner's solver estimate (kernels timed now, no calibration) against
  the solves themselves, every block's quantize_weights_shared call per tap as the pipeline makes them (with the
  diagnostics, return_info=True; after
  one warm-up call per shape; random W, H = 2/n X^T X)."""
  from qdllm_jax import config_check as config_lib
  from qdllm_jax.models import transformer as tr
  spec = _spec("tiny.py:gptq_w3")
  cfg = families.preset("tiny_llada")
  rules_plan = config_lib.check_model(spec, cfg)
  factors, solves = plan_timing.workload(cfg, rules_plan)
  times = plan_timing.measure({k: set(v) for k, v in factors.items()}, set(solves))
  lo, hi = plan_timing.durations(times, cfg, rules_plan)["solvers"]
  rng = np.random.default_rng(0)
  lin = {n: s for n, s in tr.param_shapes(cfg)["blocks"][0].items() if n in tr.LINEARS}
  calls = {}
  for path, rule in rules_plan.modules.items():
    blk, name = rules_plan.names[path]
    calls.setdefault((blk, tr.TAP_OF[name], rule), []).append(name)
  hs = {}
  for (_, tap, _), names in calls.items():
    c = lin[names[0]][1]
    if c not in hs:
      x = rng.standard_normal((4 * c, c)).astype(np.float32)
      hs[c] = 2 * x.T @ x / (4 * c)
  ws = {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in lin.items()}

  def run_all(keys):
    for (_, _, rule), names in keys:
      api.quantize_weights_shared([ws[n] for n in names], hs[lin[names[0]][1]], return_info=True, **rule.kwargs())

  run_all([(k, v) for k, v in calls.items() if k[0] == 0])  # warm-up (compile): block 0 has every shape
  t0 = time.perf_counter()
  run_all(list(calls.items()))
  measured = time.perf_counter() - t0
  assert lo > 0 and lo / 3 <= measured <= 3 * hi, (lo, hi, measured)


def test_dry_run_that_does_not_fit_exits_3(monkeypatch, capsys):
  """Every calibration chunk is split over the data axis (4 on a v5e-8): the default 8 x 4096-token chunk puts
  2 sequences per chip, 32 x 4096^2 attention scores each (f32 + bf16), and fits; a 32-sequence chunk puts 8 per
  chip (29 GiB) and does not. The FP model (15 GiB of bf16) never fits one v5e chip."""
  _no_weights(monkeypatch)
  root = plan_lib.__file__.rsplit("/qdllm_jax/", 1)[0]
  per_seq = 4096 * ((3 * 4096 + 4096 + 2 * 12288) * 4 + 32 * 4096 * 6) / GiB
  rc = launch.main(["--config", f"{root}/configs/llada8b.py", "--dry_run", "--config.plan.hardware=tpu_v5e_8"])
  out = capsys.readouterr().out
  assert rc == 0 and "FITS" in out and f"{2 * per_seq:8.2f} GiB" in out
  rc = launch.main(["--config", f"{root}/configs/llada8b.py", "--dry_run", "--config.plan.hardware=tpu_v5e_8",
                    "--config.calib.chunk_size=32"])
  out = capsys.readouterr().out
  assert rc == 3 and "DOES NOT FIT" in out and "lower calib.chunk_size" in out and f"{8 * per_seq:8.2f} GiB" in out
  rc = launch.main(["--config", f"{root}/configs/llada8b.py", "--dry_run", "--config.plan.hardware=colab_v5e_1",
                    "--config.calib.chunk_size=1"])
  out = capsys.readouterr().out
  assert rc == 3 and "evaluation, FP model" in out.split("DOES NOT FIT")[1]


def test_a_real_run_refuses_a_plan_that_does_not_fit(model_dir, tmp_path, capsys):
  from launch_common import fast_argv
  wd = tmp_path / "run"
  assert launch.main(fast_argv(model_dir, wd, "--config.plan.host_memory_gib=1e-6")) == 2
  assert "does not fit" in capsys.readouterr().err and not wd.exists()
