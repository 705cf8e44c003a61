"""capture_block: per-tap Hessians and outputs vs an independent NumPy re-run of the block."""
import jax
import jax.numpy as jnp
import np_block_ref as ref
import numpy as np
import pytest

from qdllm_jax.calib import capture
from qdllm_jax.errors import ConfigError
from qdllm_jax.models import transformer
from qdllm_jax.models.dream import DREAM_TINY_TEST, dream_config
from qdllm_jax.models.llada import LLADA_TINY_TEST, llada_config


def _setup(arch, n=5, seqlen=12, seed=0):
  cfg = llada_config(LLADA_TINY_TEST) if arch == "llada" else dream_config(DREAM_TINY_TEST)
  key = jax.random.key(seed)
  params = transformer.init_params(cfg, key, std=0.2)
  p = dict(params["blocks"][0])
  if cfg.qkv_bias:  # non-zero biases so they are exercised
    for j, b in enumerate(("q_bias", "k_bias", "v_bias")):
      p[b] = 0.3 * jax.random.normal(jax.random.fold_in(key, 100 + j), p[b].shape)
  p["attn_norm"] = 1.0 + 0.2 * jax.random.normal(jax.random.fold_in(key, 200), p["attn_norm"].shape)
  xs = jax.random.normal(jax.random.fold_in(key, 300), (n, seqlen, cfg.d_model), jnp.float32)
  return cfg, p, xs


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_hessians_and_outputs_match_numpy(arch):
  cfg, p, xs = _setup(arch)
  cap = capture.capture_block(p, xs, cfg, chunk_size=2)
  out_np, taps_np = ref.block(p, np.asarray(xs), cfg)
  assert cap.n == xs.shape[0]
  np.testing.assert_allclose(np.asarray(cap.outputs), out_np, rtol=1e-4, atol=1e-4)
  for tap, x in taps_np.items():
    h_np = ref.hessian(x)
    h = np.asarray(cap.hessians[tap])
    assert h.dtype == np.float32 and h.shape == (x.shape[-1],) * 2
    np.testing.assert_allclose(h, h_np, rtol=1e-4, atol=1e-4 * np.abs(h_np).max())


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8])
def test_chunked_equals_unchunked(chunk):
  cfg, p, xs = _setup("llada", n=5)
  full = capture.capture_block(p, xs, cfg, chunk_size=5)
  part = capture.capture_block(p, xs, cfg, chunk_size=chunk)
  np.testing.assert_allclose(np.asarray(part.outputs), np.asarray(full.outputs), rtol=1e-6, atol=1e-6)
  for tap in transformer.LINEAR_GROUPS:
    a, b = np.asarray(part.hessians[tap]), np.asarray(full.hessians[tap])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def test_host_activations_and_subset_of_taps():
  cfg, p, xs = _setup("llada", n=4)
  host = capture.capture_block(p, np.asarray(xs), cfg, taps=("o",), chunk_size=3)
  assert isinstance(host.outputs, np.ndarray) and set(host.hessians) == {"o"}
  _, taps_np = ref.block(p, np.asarray(xs), cfg)
  np.testing.assert_allclose(np.asarray(host.hessians["o"]), ref.hessian(taps_np["o"]), rtol=1e-4,
                             atol=1e-4 * np.abs(ref.hessian(taps_np["o"])).max())
  no_out = capture.capture_block(p, xs, cfg, taps=("down",), with_outputs=False)
  assert no_out.outputs is None


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_device_buffer_path_equals_host_path():
  cfg, p, xs = _setup("llada", n=5)
  dev = capture.capture_block(p, xs, cfg, taps=(), chunk_size=2, host_buffer=False)
  host = capture.capture_block(p, xs, cfg, taps=(), chunk_size=2, host_buffer=True)
  assert isinstance(dev.outputs, jax.Array)
  np.testing.assert_array_equal(np.asarray(dev.outputs), np.asarray(host.outputs))
  out_np, _ = ref.block(p, np.asarray(xs), cfg)
  np.testing.assert_allclose(np.asarray(dev.outputs), out_np, rtol=1e-4, atol=1e-4)


def test_chunk_starts_cover_each_row_once():
  for n in range(1, 12):
    for cs in range(1, 6):
      seen = np.zeros(n, int)
      for start, new in capture.chunk_starts(n, cs):
        width = min(cs, n)
        assert 0 <= start <= new < start + width <= n
        seen[new:start + width] += 1
      assert (seen == 1).all(), (n, cs)


def test_bad_arguments():
  cfg, p, xs = _setup("llada", n=2)
  with pytest.raises(ConfigError, match="unknown taps"):
    capture.capture_block(p, xs, cfg, taps=("qkvx",))
  with pytest.raises(ConfigError, match="chunk_size"):
    capture.capture_block(p, xs, cfg, chunk_size=0)
