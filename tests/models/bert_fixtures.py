"""The real all-MiniLM-L6-v2 checkpoint (installed package) and its 2-layer truncation written into a tmp dir."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qdllm_jax.models import bert

TOKENIZER = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def minilm_or_skip() -> str:
  pytest.importorskip(bert.MINILM_PACKAGE, reason=f"needs `{bert.MINILM_INSTALL}`")
  return bert.minilm_path()


def write_truncated(src: str, dst: str, n_layers: int = 2, rename=lambda k: k, extra: dict | None = None,
                    config: dict | None = None) -> str:
  """Copy of the checkpoint `src` with only its first n_layers blocks (tensor names mapped by `rename`)."""
  os.makedirs(dst, exist_ok=True)
  sd = load_file(os.path.join(src, "model.safetensors"))
  keep = {rename(k): v for k, v in sd.items()
          if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < n_layers}
  keep.update(extra or {})
  save_file(keep, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(num_hidden_layers=n_layers, **(config or {}))
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  for t in TOKENIZER:
    shutil.copy(os.path.join(src, t), os.path.join(dst, t))
  return dst


def padded_ids(rng, b: int, t: int, vocab: int = 30522):
  """Random ids [b, t] in [999, vocab) after [CLS], with right padding (pad 0) of different lengths, and mask."""
  ids = rng.integers(999, vocab, size=(b, t)).astype(np.int32)
  ids[:, 0] = 101
  lens = np.linspace(t, max(2, t // 3), b).astype(int)
  mask = (np.arange(t)[None, :] < lens[:, None]).astype(np.int32)
  return np.where(mask == 1, ids, 0).astype(np.int32), mask


@pytest.fixture(scope="session")
def minilm_dir():
  return minilm_or_skip()


@pytest.fixture(scope="session")
def minilm2_dir(minilm_dir, tmp_path_factory):
  """The real MiniLM truncated to its first 2 blocks (pooler and position_ids kept, as in the original)."""
  return write_truncated(minilm_dir, str(tmp_path_factory.mktemp("minilm2")))
