"""Fixtures of the generate / chat / serve tests: a small LLaDA over the shipped tokenizer, saved twice.

`tok_dir`: the shipped tiny tokenizer (qdllm_jax/shipped/tiny-llada) plus the Llama-3-style chat template of
launch/chat_template_llama3.jinja (LLaDA-8B-Instruct's format) in its tokenizer_config.json, so it acts as an
instruct model's tokenizer.
`fp_dir`: a random LLaDA (d_model 64, 1 block, the tokenizer's 2048 ids and special ids, context 256), saved as an
FP Hugging Face directory. `q_dir`: the same model packed and stored as the launch stores it (`save_quantized`):
the attention linears as binary planes with ABMP-style orders 1..3 per 32-column block (greedy residual
binarization, numpy; the DAQ solver's compile would cost ~15 s here and the decode path does not depend on which
solver made the planes), the MLP with min-max RTN int2 / int3 / int4 (numpy), so both packed formats run through
the kernels. Sampler compilations dominate these tests, so they share one prompt length and few (batch,
temperature) pairs.
"""
import json
import os
import shutil

import numpy as np
import pytest
from serving_common import ROOT, SHIPPED, random_params

from qdllm_jax.checkpoint import save_quantized
from qdllm_jax.engine import load_engine
from qdllm_jax.models import save_pretrained
from qdllm_jax.models.llada import LLADA_8B, llada_config
from qdllm_jax.quant import packed

TEMPLATE = os.path.join(ROOT, "launch", "chat_template_llama3.jinja")
ARCH = dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=1, mlp_hidden_size=128, max_sequence_length=256,
            vocab_size=2048, embedding_size=2048, mask_token_id=2, eos_token_id=0, pad_token_id=0, bos_token_id=1,
            torch_dtype="float32")
RTN_BITS = {"gate": 2, "up": 3, "down": 4}
BS = 32


def binary_planes(w, rng):
  """Greedy residual binarization of w [out, in] per 32-column block, orders 1..3 drawn at random:
  plane k = sign(r_k), a_r = mean |r_k| per row, r_{k+1} = r_k - a_r sign(r_k)."""
  w = np.asarray(w, np.float32)
  out, n_in = w.shape
  nb = n_in // BS
  signs = np.zeros((nb, 3, out, BS), bool)
  a_r = np.zeros((nb, 3, out), np.float32)
  for b in range(nb):
    r = w[:, b * BS:(b + 1) * BS].copy()
    for k in range(3):
      signs[b, k] = r > 0
      a_r[b, k] = np.abs(r).mean(axis=1)
      r -= a_r[b, k][:, None] * np.where(signs[b, k], 1.0, -1.0)
  orders = rng.integers(1, 4, nb)
  bits = (signs.reshape(nb, 3, out, BS // 32, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(-1)
  return packed.from_binary_planes(bits.astype(np.uint32), a_r, np.ones((nb, 3, BS), np.float32), orders,
                                   shape=(out, n_in))


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(SHIPPED, f), d / f)
  cfg = json.loads((d / "tokenizer_config.json").read_text())
  with open(TEMPLATE, encoding="utf-8") as f:
    (d / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=f.read())))
  return str(d)


def rtn(w, bits):
  """Asymmetric min-max round-to-nearest codes per 32-column group -> a uniform QuantizedWeight."""
  w = np.asarray(w, np.float32)
  g = w.reshape(w.shape[0], -1, BS)
  lo, hi = g.min(-1), g.max(-1)
  scale = np.maximum(hi - lo, 1e-6) / (2 ** bits - 1)
  zero = np.clip(np.round(-lo / scale), 0, 2 ** bits - 1)
  codes = np.clip(np.round(g / scale[..., None]) + zero[..., None], 0, 2 ** bits - 1).reshape(w.shape)
  return packed.from_uniform(codes.astype(np.uint8), scale, zero, bits=bits, group_size=BS, sym=False)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tok_dir):
  cfg = llada_config(LLADA_8B, **ARCH)
  rng = np.random.default_rng(0)
  params = random_params(cfg, rng)
  root = tmp_path_factory.mktemp("models")
  fp = save_pretrained(params, cfg, str(root / "fp"), tokenizer_from=tok_dir)
  qparams = dict(params, blocks=[dict(b) for b in params["blocks"]])
  for blk in qparams["blocks"]:
    for name in ("q", "k", "v", "o"):
      blk[name] = binary_planes(blk[name], rng)
    for name, bits in RTN_BITS.items():
      blk[name] = rtn(blk[name], bits)
  q = save_quantized(str(root / "run" / "checkpoint"), qparams, cfg, tokenizer_from=tok_dir)
  return fp, q


@pytest.fixture(scope="session")
def fp_dir(model_dirs):
  return model_dirs[0]


@pytest.fixture(scope="session")
def q_dir(model_dirs):
  return model_dirs[1]


@pytest.fixture(scope="session")
def q_engine(q_dir):
  return load_engine(q_dir)
