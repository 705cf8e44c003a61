"""The tokenizer of a Hugging Face checkpoint directory, loaded offline and without remote code."""
from __future__ import annotations

import os

from qdllm_jax.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
# any one of these makes a directory hold a tokenizer
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: str):
  """The checkpoint's tokenizer: AutoTokenizer(local_files_only=True, trust_remote_code=False).

  Checkpoints whose tokenizer_config names a remote-code class (Dream's DreamTokenizer, a copy of Qwen2's
  byte-level BPE) fall back to the built-in fast tokenizer read from tokenizer.json, or to Qwen2Tokenizer from
  vocab.json + merges.txt. No remote code is ever executed.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"tokenizer directory {path!r} does not exist")
  present = [f for f in TOKENIZER_CORE if os.path.isfile(os.path.join(path, f))]
  if not present:
    raise CheckpointError(f"{path}: no tokenizer files; expected one of {TOKENIZER_CORE} (copy them from the "
                          "original checkpoint, or save with save_pretrained(..., tokenizer_from=original))")
  import transformers  # heavy import, only when a tokenizer is needed
  try:
    # config: a blank one, so that AutoTokenizer does not parse config.json as a transformers model config (our
    # model types, e.g. `llada`, are unknown to transformers and it warns); the tokenizer class comes from
    # tokenizer_config.json either way
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                                      config=transformers.PretrainedConfig())
  except (ValueError, OSError) as e:
    err = e
  has = lambda f: os.path.isfile(os.path.join(path, f))  # noqa: E731
  try:
    if has("tokenizer.json"):
      return transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    if has("vocab.json") and has("merges.txt"):
      return transformers.Qwen2Tokenizer.from_pretrained(path, local_files_only=True)
  except (ValueError, OSError) as e:
    err = e
  raise CheckpointError(f"{path}: cannot load the tokenizer from {present} without remote code ({err}); "
                        "expected a tokenizer.json or a built-in tokenizer_class") from err
