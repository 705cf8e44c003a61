"""Calibration data of a run: the documents of a source, cut into windows (GPTQ's loader) and MCS-masked.

Sources: the shipped corpus, C4 / WikiText-2 from the offline HF datasets cache, or local files (plain text,
JSON lines, JSON, gzip, parquet). Windows and masks come from the run's key tree (key_tree.py), so the same
settings and seed give the same inputs.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from qdllm_jax.calib import mcs
from qdllm_jax.calib import text_windows as windows_lib
from qdllm_jax.data import corpus
from qdllm_jax.errors import ConfigError
from qdllm_jax.key_tree import purpose_key

CALIB_SUFFIXES = (".txt", ".jsonl", ".json", ".json.gz", ".jsonl.gz", ".parquet")


def calibration_texts(calib) -> list[str]:
  """Documents of calib.source: the shipped corpus, C4 / WikiText-2 from the offline HF cache, or local files."""
  src, field = calib.source, calib.text_field
  if src == "corpus":
    return corpus.load_splits()["train"]
  if src == "c4":
    return windows_lib.load_dataset_texts("allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz",
                                          field=field)
  if src == "wikitext2":  # one document, as GPTQ's loader joins the lines
    return ["\n\n".join(windows_lib.load_dataset_texts("wikitext", name="wikitext-2-raw-v1", field=field))]
  files = [src] if os.path.isfile(src) else sorted(
      os.path.join(src, f) for f in os.listdir(src) if f.endswith(CALIB_SUFFIXES))
  if not files:
    raise ConfigError(f"config.calib.source={src!r} holds no {CALIB_SUFFIXES} files")
  texts = []
  for f in files:
    if f.endswith(".parquet"):
      texts += windows_lib.load_dataset_texts(f, field=field)
    else:
      texts += windows_lib.read_text_files([f], field=field)
  return texts


def calibration(c, seed: int, tok, cfg) -> tuple[np.ndarray, np.ndarray, dict]:
  """(windows int32 [N, L], model inputs int32 [N T, L] (MCS-masked or plain), info) for calibration settings
  `c` (config_schema.CalibSpec) and the run's seed (key_tree: "windows" and "masks").

  Many documents (>= 4 N, e.g. C4): the GPTQ loop, tokenizing only the drawn ones. Few: all are tokenized; windows
  come from documents with >= L tokens, or from their EOS-joined stream when none is that long.
  """
  texts = calibration_texts(c)
  kw = purpose_key(seed, "windows")
  if len(texts) >= 4 * c.nsamples:  # many documents: tokenize only the drawn ones
    win = windows_lib.windows_from_texts(texts, tok, c.nsamples, c.seqlen, kw)
  else:
    docs = windows_lib.tokenize_documents(texts, tok)
    if max(d.shape[0] for d in docs) < c.seqlen:
      docs = windows_lib.docs_to_stream(docs, getattr(tok, "eos_token_id", None))
    win = windows_lib.make_windows(docs, c.nsamples, c.seqlen, kw)
  km = jax.random.fold_in(purpose_key(seed, "masks"), c.seed_x)
  ids, mask, t = mcs.mcs_mask(win, km, cfg.mask_id if cfg.mask_id is not None else -1,
                              mode="mcs" if c.mcs else "plain", prefix_ratio=c.prefix_ratio,
                              timesteps_per_sample=c.timesteps_per_sample)
  info = {"source": c.source, "n_documents": len(texts), "n_windows": int(win.shape[0]), "seqlen": c.seqlen,
          "n_sequences": int(ids.shape[0]), "mcs": c.mcs, "mask_fraction": float(np.mean(np.asarray(mask))),
          "timesteps": np.asarray(t).round(6).tolist()}
  return win, np.asarray(ids, np.int32), info
