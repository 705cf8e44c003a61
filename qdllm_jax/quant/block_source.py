"""Where the pipeline reads a model from, one block at a time: a checkpoint reader or an in-memory model, and
the calibration inputs of block 0 (the family's embedding of the ids)."""
from __future__ import annotations

import ctypes
import gc
import os

import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import ConfigError
from qdllm_jax.models import hf
from qdllm_jax.models.families import family_of
from qdllm_jax.models.hf_checkpoint import CheckpointReader
from qdllm_jax.models.model_config import ModelConfig


class _ModelSource:
  """A `Model` (or params + config) seen through the checkpoint-reader interface."""

  def __init__(self, params: dict, config: ModelConfig):
    self.params, self.config = params, config

  def block(self, i: int) -> dict:
    return dict(self.params["blocks"][i])

  def top(self) -> dict:
    return {k: v for k, v in self.params.items() if k != "blocks"}

  def embedding(self):
    return self.params["embed"]


class ReaderSource:
  """A CheckpointReader seen with params cast to `dtype` (None: as stored), as host NumPy arrays: one block at a
  time, the embedding alone for the calibration inputs, the top params (embedding, head, final norm) at the end;
  host arrays avoid a second (device) copy of the 2 x 1 GiB embedding/head of an 8B model."""

  def __init__(self, reader, dtype=None):
    self.reader, self.config, self.dtype = reader, reader.config, dtype

  def block(self, i: int) -> dict:
    return self.reader.block(i, self.dtype, numpy=True)

  def top(self) -> dict:
    return self.reader.top(self.dtype, numpy=True)

  def embedding(self):
    return self.reader.read(hf.top_names(self.config)["embed"], self.dtype, numpy=True)

  def lazy_top(self) -> dict:
    return self.reader.lazy_top(self.dtype)


def release_host_memory() -> None:
  """Hand freed host memory back to the OS between blocks: gc, then glibc's malloc_trim(0) where it exists.
  Without it the heap keeps the freed per-block buffers (W copies, Hessians, Orbax serialisation buffers)
  fragmented, and resident memory creeps up block after block. QDLLM_NO_TRIM=1 skips the trim (to measure it).
  """
  gc.collect()
  if os.environ.get("QDLLM_NO_TRIM"):
    return
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
    pass


def as_source(source):
  """A reader (`.config`, `.block(i)`, `.top()`, `.embedding()`) from a CheckpointReader, a Model or a
  (params, cfg) pair."""
  if isinstance(source, CheckpointReader):
    return ReaderSource(source)
  if hasattr(source, "block") and hasattr(source, "top") and hasattr(source, "config"):
    return source
  if hasattr(source, "params") and hasattr(source, "config"):
    return _ModelSource(source.params, source.config)
  if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], ModelConfig):
    return _ModelSource(*source)
  raise ConfigError(f"quantize_model: source of type {type(source).__name__}; expected a CheckpointReader "
                    "(models.hf_checkpoint.open_checkpoint), a Model, or (params, ModelConfig)")


def embed_inputs(source, calib_ids, *, offload_activations: bool = False):
  """x_0 = the family's embedding of calib_ids (LLaDA/Dream: Embed[ids]; BERT: LN(word + position + type)):
  int32 [N, L] -> [N, L, D] (model dtype); host NumPy when offloading."""
  src = as_source(source)
  ids = np.asarray(calib_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ConfigError(f"calib_ids has shape {ids.shape} dtype {ids.dtype}; expected int [N, L] token ids")
  v = src.config.vocab_size
  if ids.size and (ids.min() < 0 or ids.max() >= v):
    raise ConfigError(f"calib_ids hold ids in [{ids.min()}, {ids.max()}], outside the vocabulary [0, {v}); "
                      "tokenize with this model's tokenizer and mask with its mask id")
  family = family_of(src.config)
  if family.embed_keys == ("embed",):
    emb = src.embedding() if hasattr(src, "embedding") else src.top()["embed"]
    if isinstance(emb, np.ndarray):  # a host table: gather the rows on the host, never copy the whole table
      x = np.take(emb, ids.astype(np.int64), axis=0)
      return x if offload_activations else jnp.asarray(x)
    emb = {"embed": emb}
  else:
    top = src.top()
    emb = {k: jnp.asarray(top[k]) for k in family.embed_keys}
  x = family.embed(emb, jnp.asarray(ids, jnp.int32), src.config)
  return np.asarray(x) if offload_activations else x
