"""Parity with an independent PyTorch reference: transformers' LlamaForCausalLM (LLaDA: no biases, MHA) and
Qwen2ForCausalLM (Dream: q/k/v biases, GQA), same random weights, causal mask removed by passing a 4D additive
mask (0 for real keys, -1e30 for padding keys), eager attention, float32.

Weights reach torch through the files `save_pretrained` writes: Dream's HF names are Qwen2's own, so the
safetensors file is loaded into Qwen2 strictly; LLaDA's names are renamed with the checkpoint's own tensor names.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from qdllm_jax.models import hf_checkpoint as cio  # noqa: E402
from qdllm_jax.models.dream import DREAM_TINY_TEST, dream_config  # noqa: E402
from qdllm_jax.models.llada import LLADA_TINY_TEST, llada_config  # noqa: E402

pytestmark = pytest.mark.torch

LLADA_TO_LLAMA = {  # LLaDA checkpoint names -> transformers Llama
    "model.transformer.wte.weight": "model.embed_tokens.weight", "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight"}
LLADA_BLOCK_TO_LLAMA = {
    "attn_norm.weight": "input_layernorm.weight", "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight", "v_proj.weight": "self_attn.v_proj.weight",
    "attn_out.weight": "self_attn.o_proj.weight", "ff_norm.weight": "post_attention_layernorm.weight",
    "ff_proj.weight": "mlp.gate_proj.weight", "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight"}


def llada_to_llama(sd):
  out = {}
  for k, v in sd.items():
    if k in LLADA_TO_LLAMA:
      out[LLADA_TO_LLAMA[k]] = v
    else:
      assert k.startswith("model.transformer.blocks."), k
      n, rest = k[len("model.transformer.blocks."):].split(".", 1)
      out[f"model.layers.{n}.{LLADA_BLOCK_TO_LLAMA[rest]}"] = v
  return out


def torch_reference(cfg, ckpt_dir):
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, tie_word_embeddings=False, max_position_embeddings=256,
                attn_implementation="eager", torch_dtype=torch.float32)
  sd = load_file(os.path.join(ckpt_dir, "model.safetensors"))
  if cfg.arch == "llada":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common))
    sd = llada_to_llama(sd)
  else:
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(use_sliding_window=False, **common))
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
  return model.eval()


def torch_logits(model, cfg, ids, mask):
  b, t = ids.shape
  m = np.ones((b, t), bool) if mask is None else mask
  dtype = next(model.parameters()).dtype
  bias = np.where(m[:, None, None, :], 0.0, -1e30).astype(np.float32)
  bias = torch.from_numpy(np.broadcast_to(bias, (b, 1, t, t)).copy()).to(dtype)  # bidirectional
  pos = np.broadcast_to(np.arange(t), (b, t))
  if cfg.arch == "dream" and mask is not None:
    pos = np.where(m, np.cumsum(m, -1) - 1, 1)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=bias,
                position_ids=torch.from_numpy(np.ascontiguousarray(pos).astype(np.int64)))
  return out.logits.float().numpy()


@pytest.fixture(scope="module", params=["llada", "dream"])
def setup(request, tmp_path_factory, make_params):
  cfg = llada_config(LLADA_TINY_TEST) if request.param == "llada" else dream_config(DREAM_TINY_TEST)
  params = make_params(cfg, seed=11, scale=0.3)
  path = cio.save_pretrained(params, cfg, tmp_path_factory.mktemp(request.param) / "ckpt")
  rng = np.random.default_rng(12)
  ids = rng.integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
  mask = np.ones((2, 12), bool)
  mask[1, :4] = False  # left padding
  return cio.load_pretrained(path), torch_reference(cfg, path), ids, mask


@pytest.mark.parametrize("use_mask", [False, True])
def test_logits_match_torch_float32(setup, use_mask):
  model, ref, ids, mask = setup
  mask = mask if use_mask else None
  ours = np.asarray(model(jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))
  theirs = torch_logits(ref, model.config, ids, mask)
  real = np.ones(ids.shape, bool) if mask is None else mask
  assert ours.shape == theirs.shape == (2, 12, model.config.vocab_size)
  assert np.abs(theirs).max() > 1.0  # non-trivial logits
  err = np.abs(ours[real] - theirs[real]).max()
  assert err <= 1e-4, err


def test_causal_reference_differs(setup):
  """The comparison can fail: transformers' default (causal) forward is far from our bidirectional one."""
  model, ref, ids, _ = setup
  with torch.no_grad():
    causal = ref(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  assert np.abs(np.asarray(model(jnp.asarray(ids))) - causal).max() > 1e-2


def test_bf16_forward_close_to_float32(setup):
  """bf16 weights/activations: as close to the f32 reference as torch's own bf16 forward is (both ~3-5%)."""
  model, ref, ids, mask = setup
  theirs = torch_logits(ref, model.config, ids, mask)
  bf = model.replace_params(jax.tree.map(lambda a: a.astype(jnp.bfloat16), model.params))
  ours = np.asarray(bf(jnp.asarray(ids), jnp.asarray(mask)))
  theirs_bf = torch_logits(ref.to(torch.bfloat16), model.config, ids, mask)
  ref.to(torch.float32)
  assert ours.dtype == np.float32
  scale = np.abs(theirs[mask]).max()
  err = np.abs(ours[mask] - theirs[mask]).max() / scale
  torch_err = np.abs(theirs_bf[mask] - theirs[mask]).max() / scale
  assert err < 0.1 and err < 3 * torch_err, (err, torch_err)
