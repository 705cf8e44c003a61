"""Fixtures of the launch tests: a small byte-level BPE tokenizer and a random tiny LLaDA checkpoint.

The model has the real LLaDA tensor names and config.json (models/llada.py), d_model 64, 4 heads, 2 blocks,
SwiGLU 128, float32, and the tokenizer's vocabulary and special ids (EOS 0, BOS 1, <|mdm_mask|> 2).
`FAST` are the overrides of the fast end-to-end runs (4 x 32 calibration tokens, 32-column blocks).
"""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCH = dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128, max_sequence_length=256,
            torch_dtype="float32")
FAST = [("calib.nsamples", "4"), ("calib.seqlen", "32"), ("calib.chunk_size", "2"), ("quant.group_size", "32"),
        ("quant.abmp_ratio", "0.25"), ("quant.rsr_iters", "3"), ("eval.protocol", ""), ("mesh.shape", "(1,1)"),
        ("report.plots", "False")]


def make_model(out_dir, tok_dir, seed=0, **arch):
  """Write a random LLaDA checkpoint with the tokenizer's ids into out_dir; returns its ModelConfig."""
  import jax

  from qdllm_jax.data import tokenizer
  from qdllm_jax.models import hf_checkpoint, transformer
  from qdllm_jax.models.llada import LLADA_8B, llada_config
  tok = tokenizer.load_tokenizer(tok_dir)
  cfg = llada_config(LLADA_8B, **{**tokenizer.config_overrides(tok), **ARCH, **arch})
  params = transformer.init_params(cfg, jax.random.key(seed), std=0.1)
  hf_checkpoint.save_pretrained(params, cfg, str(out_dir), tokenizer_from=tok_dir, overwrite=True)
  return cfg


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
  from qdllm_jax.data import corpus, tokenizer
  d = tmp_path_factory.mktemp("tok")
  tokenizer.train_tokenizer(corpus.load_splits()["train"][:60], str(d), vocab_size=320)
  return str(d)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tok_dir):
  d = tmp_path_factory.mktemp("model") / "tiny-random"
  make_model(d, tok_dir)
  return str(d)


def fast_argv(model_dir, workdir, *extra, preset=""):
  """argv of launch.main for a fast run of configs/tiny.py on the random model."""
  cfg = os.path.join(ROOT, "configs", "tiny.py") + (f":{preset}" if preset else "")
  return (["--config", cfg, "--workdir", str(workdir), f"--config.model_path={model_dir}"]
          + [f"--config.{k}={v}" for k, v in FAST] + list(extra))
