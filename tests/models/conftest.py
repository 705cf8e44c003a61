"""Fixtures for the model tests: the tiny LLaDA/Dream configs and random params with non-trivial norms/biases."""
import numpy as np
import pytest

from qdllm_jax.models import transformer
from qdllm_jax.models.dream import DREAM_TINY_TEST, dream_config
from qdllm_jax.models.llada import LLADA_TINY_TEST, llada_config


def random_params(cfg, seed=0, dtype=np.float32, scale=0.2):
  """NumPy params: matrices N(0, scale^2), norms 1 + N(0, 0.1^2), biases N(0, 0.1^2) (so every leaf matters)."""
  rng = np.random.default_rng(seed)
  shapes = transformer.param_shapes(cfg)

  def leaf(name, shape):
    if "norm" in name:
      x = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith("bias"):
      x = 0.1 * rng.standard_normal(shape)
    else:
      x = scale * rng.standard_normal(shape)
    return x.astype(np.float32).astype(dtype)

  out = {k: leaf(k, s) for k, s in shapes.items() if k != "blocks"}
  out["blocks"] = [{k: leaf(k, s) for k, s in b.items()} for b in shapes["blocks"]]
  return out


@pytest.fixture(params=["llada", "dream"])
def arch(request):
  return request.param


@pytest.fixture
def tiny_cfg(arch):
  return llada_config(LLADA_TINY_TEST) if arch == "llada" else dream_config(DREAM_TINY_TEST)


@pytest.fixture(scope="session")
def make_params():
  return random_params


from bert_fixtures import minilm2_dir, minilm_dir  # noqa: E402,F401  (the real BERT fixtures)
