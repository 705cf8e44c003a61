"""Resume state: quantize_model resumed from a saved state equals the uninterrupted run bit for bit.

Reference: the uninterrupted `quantize_model` run on the same tiny random LLaDA (calibration ids random ints
[4, 16], group_size 32). A perturbed-activations resume shows the comparison can fail (GPTQ depends on x).
"""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ckpt_common import CFG
from test_ckpt_roundtrip import assert_bitwise_equal

from qdllm_jax.checkpoint import checkpoint_nbytes, load_state, save_quantized, save_state, size_summary
from qdllm_jax.checkpoint.state import PipelineState
from qdllm_jax.errors import ConfigError
from qdllm_jax.models import transformer
from qdllm_jax.models.model import Model
from qdllm_jax.quant import packed, pipeline, rules

IDS = np.random.default_rng(7).integers(0, CFG.vocab_size, (4, 16)).astype(np.int32)


def _bits(a):
  a = np.asarray(a)
  return a.dtype, a.shape, a.tobytes()


def _no_time(report):
  return [{k: v for k, v in e.items() if k != "time_s"} for e in report]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_resume_is_bit_exact(tmp_path, method):
  model = Model(params=transformer.init_params(CFG, jax.random.key(0), std=0.2), config=CFG)
  plan = rules.default_rules(method, 2, 32)
  fp = f"tiny-llada/{method}/seed0"
  live = {}

  def callback(state, block_report):
    save_state(tmp_path / "every", state, fingerprint=fp)
    if state.next_block == 1:
      live["x"] = np.asarray(state.x)
      save_state(tmp_path / "after0", state, fingerprint=fp)
  full, report = pipeline.quantize_model(model, IDS, plan, hooks=pipeline.BlockHooks(on_block=callback))
  # only the newest state is kept
  assert sorted(os.listdir(tmp_path / "every")) == ["blocks", "state-000002"]
  final = load_state(tmp_path / "every", fp)
  assert final.next_block == CFG.n_layers and _no_time(final.report) == _no_time(report)
  assert_bitwise_equal(final.blocks, [jax.device_get(b) for b in full["blocks"]])

  state = load_state(tmp_path / "after0", fp)
  assert state.next_block == 1 and len(state.blocks) == 1 and state.orders is None
  assert _bits(state.x) == _bits(live["x"]) and state.x.shape == (4, 16, CFG.d_model)
  assert np.asarray(state.x).dtype == np.float32
  resumed, report2 = pipeline.quantize_model(model, IDS, plan, resume=state)
  assert_bitwise_equal(jax.device_get(resumed), jax.device_get(full))
  assert _no_time(report2) == _no_time(report)

  with pytest.raises(ConfigError, match=f"fingerprint '{fp}'.*current run's fingerprint is 'other-run'"):
    load_state(tmp_path / "after0", "other-run")
  assert load_state(tmp_path / "missing", fp) is None

  if method == "gptq":  # the comparison can fail: resuming from slightly different activations changes W^
    noise = np.random.default_rng(0).standard_normal(state.x.shape).astype(np.float32)
    bad = PipelineState(**{**state.__dict__, "x": np.asarray(state.x) + np.float32(0.05) * noise})
    perturbed, _ = pipeline.quantize_model(model, IDS, plan, resume=bad)
    with pytest.raises(AssertionError):
      assert_bitwise_equal(jax.device_get(perturbed["blocks"][1]), jax.device_get(full["blocks"][1]))

def test_state_keeps_orders_and_global_bits(tmp_path):
  rng = np.random.default_rng(0)
  qw = packed.from_uniform(rng.integers(0, 4, (8, 64)), rng.random((8, 2)), rng.integers(0, 4, (8, 2)), bits=2,
                           group_size=32, sym=False, g_idx=rng.integers(0, 2, 64))
  block = {"q": jax.device_get(qw), "attn_norm": np.ones(32, jnp.bfloat16)}
  orders = {(0, "q"): np.array([1], np.int8), (1, "gate"): np.array([3], np.int8)}
  st = PipelineState(next_block=1, x=jnp.ones((2, 3, CFG.d_model), jnp.bfloat16), blocks=[block],
                     report=[{"layer": 0, "rel_err": 0.1 + 0.2, "orders": [1, 2]}], orders=orders,
                     global_bits=2.0123456789012345)
  save_state(tmp_path, st, fingerprint="f")
  got = load_state(tmp_path, "f")
  assert got.global_bits == st.global_bits and got.report == st.report
  assert {k: _bits(v) for k, v in got.orders.items()} == {k: _bits(v) for k, v in orders.items()}
  assert_bitwise_equal(got.blocks, [block])
  with pytest.raises(ConfigError, match="2 finished blocks for next_block=1"):
    save_state(tmp_path, PipelineState(**{**st.__dict__, "blocks": [st.blocks[0]] * 2}), fingerprint="f")
  with pytest.raises(ConfigError, match="fingerprint=None"):
    save_state(tmp_path, st, fingerprint=None)


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from qdllm_jax.checkpoint import save_state, store
    from qdllm_jax.quant.pipeline import PipelineState
    real = store.write_text
    def die(path, text):  # block 1 and the arrays of state 2 are on disk, its state.json half-written: kill -9
      if not path.endswith("state.json"):
        return real(path, text)
      with open(path, "w") as f:
        f.write(text[: len(text) // 2])
      os.kill(os.getpid(), signal.SIGKILL)
    store.write_text = die
    st = PipelineState(next_block=2, x=np.full((2, 3, 4), 7, np.float32),
                       blocks=[{"w": np.zeros(3, np.float32)}, {"w": np.ones(3, np.float32)}], report=[])
    save_state(sys.argv[1], st, fingerprint="f")
""")


def test_kill_9_mid_write_keeps_previous_state(tmp_path):
  prev = PipelineState(next_block=1, x=np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                       blocks=[{"w": np.full(3, 5, np.float32)}], report=[{"layer": 0}])
  save_state(tmp_path, prev, fingerprint="f")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env, capture_output=True,
                        timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  names = os.listdir(tmp_path)
  assert "state-000001" in names and any(n.startswith(".state-000002.tmp-") for n in names)
  assert sorted(os.listdir(tmp_path / "blocks")) == ["block-000000", "block-000001"]
  got = load_state(tmp_path, "f")
  assert got.next_block == 1 and _bits(got.x) == _bits(prev.x) and got.report == prev.report
  assert _bits(got.blocks[0]["w"]) == _bits(prev.blocks[0]["w"])
  save_state(tmp_path, PipelineState(**{**prev.__dict__, "next_block": 2, "blocks": prev.blocks * 2}),
             fingerprint="f")
  assert sorted(os.listdir(tmp_path)) == ["blocks", "state-000002"]  # the killed writer's temporary dir is cleaned up


def test_checkpoint_bytes_match_reported_bits(tmp_path):
  """The launch check: stored bytes of the packed linears = sum over the report of bits_per_weight * out * in / 8."""
  model = Model(params=transformer.init_params(CFG, jax.random.key(2), std=0.2), config=CFG)
  plan = [(r"blocks\.0\..*", rules.Rule("rtn", 2, 32, ())), (r".*", rules.Rule("rtn", 3, 32, (("sym", True),)))]
  params, report = pipeline.quantize_model(model, IDS, plan)
  path = save_quantized(tmp_path / "q", params, CFG, metadata={"report": report})
  shapes = transformer.param_shapes(CFG)["blocks"][0]
  reported_bytes = sum(e["bits_per_weight"] * shapes[e["name"]][0] * shapes[e["name"]][1] / 8 for e in report)
  s = size_summary(path)
  assert s["quantized_bytes"] == pytest.approx(reported_bytes, abs=1e-6)
  assert s["quantized_params"] == transformer.num_params(CFG) - s["dense_params"]
  assert checkpoint_nbytes(path) == s["total_bytes"]
  dense = sum(np.asarray(params[k]).nbytes for k in ("embed", "head", "final_norm")) + sum(
      np.asarray(b[k]).nbytes for b in params["blocks"] for k in ("attn_norm", "ff_norm"))
  assert s["dense_bytes"] == dense
  # 2-bit groups of 32: 2 bits + (fp16 scale + uint8 zero) / 32;  3-bit sym: 32 codes in 3 words + fp16 scale
  want0 = sum(shapes[n][0] * shapes[n][1] * (2 / 8) + shapes[n][0] * (shapes[n][1] // 32) * 3
              for n in transformer.LINEARS)
  want1 = sum(shapes[n][0] * shapes[n][1] * (3 / 8) + shapes[n][0] * (shapes[n][1] // 32) * 2
              for n in transformer.LINEARS)
  assert s["quantized_bytes"] == want0 + want1


def test_spilled_blocks_equal_in_memory_and_are_written_once(tmp_path):
  """checkpoint.spilling_hook: the next hook sees only SpilledBlock references (no finished block in memory), each block
  directory is written once (its files keep their first inode and mtime), and the params equal the in-memory
  run bit for bit; a lazy resume from the spilled state ends the same; a deleted block is reported."""
  from qdllm_jax.checkpoint import SpilledBlock, load_block, spilling_hook
  model = Model(params=transformer.init_params(CFG, jax.random.key(3), std=0.2), config=CFG)
  plan = rules.default_rules("gptq", 2, 32)
  ref, _ = pipeline.quantize_model(model, IDS, plan)
  stamps = {}

  def callback(state, block_report):
    assert all(isinstance(b, SpilledBlock) for b in state.blocks) and len(state.blocks) == state.next_block
    for i in range(state.next_block):
      st = os.stat(tmp_path / "blocks" / f"block-{i:06d}" / "block.json")
      stamps.setdefault(i, (st.st_ino, st.st_mtime_ns))
      assert (st.st_ino, st.st_mtime_ns) == stamps[i], f"block {i} rewritten after block {state.next_block - 1}"
    if state.next_block == 1:
      live["after0"] = load_state(tmp_path, "fp", lazy=True)
  live = {}
  got, _ = pipeline.quantize_model(model, IDS, plan, hooks=pipeline.BlockHooks(
      on_block=spilling_hook(str(tmp_path), "fp", then=callback)))
  assert len(stamps) == CFG.n_layers and all(isinstance(b, SpilledBlock) for b in got["blocks"])
  # save_quantized streams the references: the same checkpoint content as from the in-memory blocks
  from qdllm_jax.workdir import content_digest
  a = save_quantized(tmp_path / "from_spill", got, CFG)
  b = save_quantized(tmp_path / "from_memory", ref, CFG)
  assert content_digest(a) == content_digest(b)
  got = dict(got, blocks=[load_block(b) for b in got["blocks"]])
  assert_bitwise_equal(jax.device_get(got), jax.device_get(ref))
  resumed, _ = pipeline.quantize_model(model, IDS, plan, resume=live["after0"])
  assert_bitwise_equal(jax.device_get(resumed), jax.device_get(ref))
  assert_bitwise_equal(load_block(live["after0"].blocks[0]), jax.device_get(ref["blocks"][0]))
  import shutil
  shutil.rmtree(tmp_path / "blocks" / "block-000000")
  with pytest.raises(Exception, match=r"blocks \[0\] are missing"):
    load_state(tmp_path, "fp")
