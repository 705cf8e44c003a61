"""`Model`: a params pytree plus its static config, callable as `model(input_ids, attention_mask=None)`.

A `flax.struct.dataclass`, so a Model is itself a pytree: pass it straight into `jax.jit`ted samplers and
estimators (the config is static aux data, the params are leaves).
"""
from __future__ import annotations

import jax
from flax import struct

from qdllm_jax.models import families
from qdllm_jax.models.act_fake_quant import ActQuant
from qdllm_jax.models.model_config import ModelConfig


@struct.dataclass
class Model:
  """A network of any registered family (models/families.py: LLaDA, Dream, BERT).

  `model(input_ids, attention_mask=None)`: int32 [B, T] (mask bool/int [B, T], 1 = real token) ->
  float32 logits [B, T, vocab], the same convention as the PyTorch original's forward (Dream: unshifted);
  a BERT checkpoint without an MLM head (`config.has_head` False, e.g. all-MiniLM-L6-v2) returns its last
  hidden states float32 [B, T, d_model] instead.
  `act` (static, optional): an `act_fake_quant.ActQuant` applied to every block linear's input (W8A8 / W4A4
  baselines); the blocks' online transforms, if any, live in the params (`p["online"]`).
  """
  params: dict
  config: ModelConfig = struct.field(pytree_node=False)
  act: ActQuant | None = struct.field(pytree_node=False, default=None)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    return families.forward_jit(self.params, self.config, input_ids, attention_mask, act=self.act)

  @property
  def mask_id(self) -> int:
    return self.config.mask_id

  def replace_params(self, params: dict) -> "Model":
    return self.replace(params=params)
