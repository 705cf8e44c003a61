"""Shared tiny LLaDA fixtures for the baseline tests."""
import jax
import numpy as np
import pytest

from qdllm_jax.models import transformer
from qdllm_jax.models.families import config_from_hf
from qdllm_jax.models.llada import LLADA_TINY_TEST


@pytest.fixture(scope="session")
def cfg():
  return config_from_hf(LLADA_TINY_TEST)


def outlier_params(cfg, seed=0, factor=30.0, std=0.1):
  """Random params whose RMSNorm outputs carry one outlier channel (norm weight x factor) while the linears
  reading them have that column / factor: the FP function is that of an ordinary random model."""
  p = transformer.init_params(cfg, jax.random.PRNGKey(seed), std=std)
  blocks = []
  for i, b in enumerate(p["blocks"]):
    b = {k: np.array(v) for k, v in b.items()}
    j = (3 + i) % cfg.d_model
    for norm, names in (("attn_norm", ("q", "k", "v")), ("ff_norm", ("gate", "up"))):
      b[norm][j] *= factor
      for n in names:
        b[n][:, j] /= factor
    blocks.append({k: jax.numpy.asarray(v) for k, v in b.items()})
  return dict(p, blocks=blocks)


@pytest.fixture(scope="session")
def ids(cfg):
  return np.asarray(jax.random.randint(jax.random.PRNGKey(7), (4, 16), 0, cfg.vocab_size), np.int32)


def residual_outlier_params(cfg, seed=0, factor=40.0, std=0.1):
  """Random params with one massive residual-stream channel (embedding column x factor) and random
  non-unit norm weights: RMSNorm outputs then carry the outlier channel after any norm folding."""
  p = transformer.init_params(cfg, jax.random.PRNGKey(seed), std=std)
  emb = np.array(p["embed"])
  emb[:, 5] *= factor
  rng = np.random.default_rng(seed)
  blocks = [dict(b, attn_norm=jax.numpy.asarray(rng.uniform(0.5, 1.5, cfg.d_model), np.float32),
                 ff_norm=jax.numpy.asarray(rng.uniform(0.5, 1.5, cfg.d_model), np.float32)) for b in p["blocks"]]
  return dict(p, embed=jax.numpy.asarray(emb), blocks=blocks,
              final_norm=jax.numpy.asarray(rng.uniform(0.5, 1.5, cfg.d_model), np.float32))
