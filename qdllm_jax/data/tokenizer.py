"""Byte-level BPE tokenizer of the tiny LLaDA, trained with `tokenizers`, saved in Hugging Face format.

Special tokens take the first ids: `<|endoftext|>` 0 (EOS and pad, as in LLaDA where EOS = pad),
`<|bos|>` 1, `<|mdm_mask|>` 2 (the diffusion mask). The saved directory loads offline with
`transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)`. The tokenizer adds no special
tokens by itself; `encode_*` helpers in `qdllm_jax.data.sequences` put BOS/EOS where the format needs them.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from qdllm_jax.errors import ConfigError

EOS, BOS, MASK = "<|endoftext|>", "<|bos|>", "<|mdm_mask|>"
SPECIALS = (EOS, BOS, MASK)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 2048, min_frequency: int = 2):
  """Train a byte-level BPE of `vocab_size` ids (specials included) on `texts`; save HF files to out_dir.

  Returns the `transformers.PreTrainedTokenizerFast`.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  if vocab_size < 256 + len(SPECIALS):
    raise ConfigError(f"vocab_size={vocab_size} is below the 256 byte symbols + {len(SPECIALS)} specials")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                 mask_token=MASK, unk_token=None, clean_up_tokenization_spaces=False)
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  # transformers 5 writes tokenizer_class "TokenizersBackend", which transformers 4 cannot resolve; the
  # fast-tokenizer class name loads under both.
  cfg_file = os.path.join(out_dir, "tokenizer_config.json")
  with open(cfg_file) as f:
    tcfg = json.load(f)
  tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
  with open(cfg_file, "w") as f:
    json.dump(tcfg, f, indent=2)
  # transformers >= 5 no longer writes special_tokens_map.json; older readers and tools expect it.
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "mask_token": MASK}, f, indent=2)
  return fast


def load_tokenizer(path: str):
  """Load the tokenizer directory offline and check the special-token ids (EOS 0, BOS 1, MASK 2)."""
  from transformers import AutoTokenizer
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    raise ConfigError(f"{path}: tokenizer.json not found; expected a directory written by train_tokenizer")
  tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  got = special_ids(tok)
  if got != {"eos": 0, "bos": 1, "mask": 2, "pad": 0}:
    raise ConfigError(f"{path}: special token ids {got}; expected eos=pad=0, bos=1, mask=2")
  return tok


def special_ids(tok) -> dict[str, int]:
  """{'eos', 'bos', 'mask', 'pad'} -> id, read from the tokenizer's vocabulary."""
  ids = {n: tok.convert_tokens_to_ids(t) for n, t in (("eos", EOS), ("bos", BOS), ("mask", MASK))}
  ids["pad"] = tok.pad_token_id
  return ids


def config_overrides(tok) -> dict:
  """The LLaDA config.json fields that must match the tokenizer (vocab and special ids)."""
  ids = special_ids(tok)
  return {"vocab_size": len(tok), "embedding_size": len(tok), "mask_token_id": ids["mask"],
          "eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "bos_token_id": ids["bos"]}
