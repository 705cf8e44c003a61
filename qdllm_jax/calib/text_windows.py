"""Calibration windows: fixed-length token windows cut from documents (GPTQ-style C4 loader).

GPTQ's C4 loader draws random documents with at least `seqlen` tokens and takes one random `seqlen`-token
window from each. `make_windows` does this on already tokenized documents (or one long token stream);
`windows_from_texts` does it lazily on raw texts, tokenizing only the documents it draws (a C4 shard has
~356k documents). Text sources: `read_text_files` (plain text or JSON-lines files) and
`load_dataset_texts` (a Hugging Face `datasets` dataset, loaded from the local cache or local files; set
`HF_DATASETS_OFFLINE=1`). All randomness comes from a JAX key, so windows are reproducible.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

from qdllm_jax.errors import ConfigError


def as_key(seed_or_key) -> jax.Array:
  """A JAX PRNG key from an int seed (`jax.random.key(seed)`) or an existing key (returned unchanged)."""
  if isinstance(seed_or_key, (int, np.integer)):
    return jax.random.key(int(seed_or_key))
  return seed_or_key


def _uniform_ints(key: jax.Array, n: int, highs: np.ndarray) -> np.ndarray:
  """n draws k_i uniform on {0, ..., highs_i - 1} (int64 [n]), via floor(u * high) with u ~ U[0, 1)."""
  u = np.asarray(jax.random.uniform(key, (n,), dtype=np.float32), dtype=np.float64)
  return np.minimum(np.floor(u * highs).astype(np.int64), np.asarray(highs, np.int64) - 1)


def make_windows(token_stream_or_docs, n: int, seqlen: int, key) -> np.ndarray:
  """n calibration windows of `seqlen` tokens, int32 [n, seqlen].

  * One stream (a 1-D int array): n window starts s_i ~ U{0, ..., len - seqlen}.
  * Documents (a sequence of 1-D int arrays): n distinct documents with len >= seqlen drawn uniformly
    (with replacement only when fewer than n are long enough), one start s_i ~ U{0, ..., len_i - seqlen}
    in each.

  Args:
    token_stream_or_docs: int array [T], or a sequence of int arrays [T_d].
    n, seqlen: number and length of the windows.
    key: int seed or JAX key.
  Raises:
    ConfigError: if no document (or the stream) has `seqlen` tokens.
  """
  if n < 1 or seqlen < 1:
    raise ConfigError(f"make_windows: n={n}, seqlen={seqlen}; both must be >= 1")
  k_doc, k_start = jax.random.split(as_key(key))
  if isinstance(token_stream_or_docs, (np.ndarray, jax.Array)) and np.ndim(token_stream_or_docs) == 1:
    stream = np.asarray(token_stream_or_docs)
    if stream.shape[0] < seqlen:
      raise ConfigError(f"make_windows: the token stream has {stream.shape[0]} tokens, fewer than seqlen={seqlen}; "
                        "use more text or a shorter seqlen")
    starts = _uniform_ints(k_start, n, np.full(n, stream.shape[0] - seqlen + 1))
    return np.stack([stream[s:s + seqlen] for s in starts]).astype(np.int32)
  docs = [np.asarray(d).reshape(-1) for d in token_stream_or_docs]
  eligible = [d for d in docs if d.shape[0] >= seqlen]
  if not eligible:
    longest = max((d.shape[0] for d in docs), default=0)
    raise ConfigError(f"make_windows: none of the {len(docs)} documents has seqlen={seqlen} tokens (longest: "
                      f"{longest}); lower seqlen, add longer documents, or concatenate them with docs_to_stream")
  pick = np.asarray(jax.random.choice(k_doc, len(eligible), (n,), replace=n > len(eligible)))
  highs = np.array([eligible[i].shape[0] - seqlen + 1 for i in pick])
  starts = _uniform_ints(k_start, n, highs)
  return np.stack([eligible[i][s:s + seqlen] for i, s in zip(pick, starts)]).astype(np.int32)


def docs_to_stream(docs: Sequence, sep_id: int | None = None) -> np.ndarray:
  """Concatenate tokenized documents into one int32 stream [sum T_d (+ separators)], `sep_id` between them."""
  parts = []
  for i, d in enumerate(docs):
    if i and sep_id is not None:
      parts.append(np.array([sep_id], np.int32))
    parts.append(np.asarray(d, np.int32).reshape(-1))
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def _encode(tokenizer, text: str) -> np.ndarray:
  if hasattr(tokenizer, "encode"):
    try:
      ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
      ids = tokenizer.encode(text)
  else:
    ids = tokenizer(text)
  if isinstance(ids, dict) or hasattr(ids, "keys"):
    ids = ids["input_ids"]
  return np.asarray(ids, np.int32).reshape(-1)


def tokenize_documents(texts: Sequence[str], tokenizer) -> list[np.ndarray]:
  """Tokenize each text on its own (no special tokens): list of int32 [T_d].

  `tokenizer` is a Hugging Face tokenizer (`encode(text, add_special_tokens=False)`) or any callable
  text -> ids.
  """
  return [_encode(tokenizer, t) for t in texts]


def windows_from_texts(texts: Sequence[str], tokenizer, n: int, seqlen: int, key,
                       max_draws: int | None = None) -> np.ndarray:
  """The GPTQ C4 loop on raw texts: int32 [n, seqlen].

  Draw i ~ U{0..len(texts)-1} (key fold_in(k, draw)), tokenize text i, keep it if it has >= seqlen tokens
  and take a window starting at s ~ U{0..len-seqlen}; repeat until n windows. Only drawn texts are
  tokenized. Raises ConfigError after `max_draws` (default 100 n) draws without n windows.
  """
  if not texts:
    raise ConfigError("windows_from_texts: no texts given")
  key = as_key(key)
  max_draws = max_draws or 100 * n
  out = []
  for draw in range(max_draws):
    if len(out) == n:
      break
    k_doc, k_start = jax.random.split(jax.random.fold_in(key, draw))
    i = int(_uniform_ints(k_doc, 1, np.array([len(texts)]))[0])
    ids = _encode(tokenizer, texts[i])
    if ids.shape[0] >= seqlen:
      s = int(_uniform_ints(k_start, 1, np.array([ids.shape[0] - seqlen + 1]))[0])
      out.append(ids[s:s + seqlen])
  if len(out) < n:
    raise ConfigError(f"windows_from_texts: only {len(out)} of {n} windows of {seqlen} tokens after {max_draws} "
                      "draws; the texts are too short for this seqlen (lower it or use longer documents)")
  return np.stack(out).astype(np.int32)


def _fix_hint(field: str) -> str:
  return (f"use a JSON-lines file with one object per line holding the text under {field!r} "
          "(--config.calib.text_field names another field), or a plain .txt file")


def _json_lines(path: str, data: bytes, field: str) -> list[str]:
  """Documents of JSON-lines bytes (one object per line, text under `field`); a .json file may instead hold one
  JSON array of such objects. ConfigError naming the file and line of the first bad line."""
  text = _utf8(path, data)
  if path.endswith(".json") and text.lstrip().startswith("["):
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      raise ConfigError(f"calibration file {path}, line {e.lineno}: not valid JSON ({e.msg}); "
                        f"{_fix_hint(field)}") from e
    lines = [(i + 1, r) for i, r in enumerate(rows)]
    unit = "item"
  else:
    lines, unit = [], "line"
    for i, line in enumerate(text.split("\n"), 1):
      if not line.strip():
        continue
      try:
        lines.append((i, json.loads(line)))
      except json.JSONDecodeError as e:
        raise ConfigError(f"calibration file {path}, line {i}: not valid JSON ({e.msg} at column {e.colno}); "
                          f"{_fix_hint(field)}") from e
  texts = []
  for i, row in lines:
    if not isinstance(row, dict) or field not in row:
      found = f"keys {sorted(row)[:6]}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
      raise ConfigError(f"calibration file {path}, {unit} {i}: no field {field!r} (found {found}); "
                        f"{_fix_hint(field)}")
    if not isinstance(row[field], str):
      raise ConfigError(f"calibration file {path}, {unit} {i}: field {field!r} is a {type(row[field]).__name__}, "
                        f"expected a string; {_fix_hint(field)}")
    texts.append(row[field])
  return texts


def _utf8(path: str, data: bytes) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise ConfigError(f"calibration file {path}, line {line} (byte {e.start}): not UTF-8 ({e.reason}); convert "
                      f"it, e.g. `iconv -f latin1 -t utf-8 {os.path.basename(path)}`, or pass another file") from e


def _read_bytes(path: str) -> bytes:
  """The file's bytes, gunzipped for a .gz file; ConfigError naming the file when it cannot be read."""
  import gzip
  import zlib
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    what = "a readable gzip file" if path.endswith(".gz") else "a readable file"
    raise ConfigError(f"calibration file {path}: not {what} ({type(e).__name__}: {e}); check the file (e.g. "
                      f"`{'zcat' if path.endswith('.gz') else 'head'} {os.path.basename(path)} | head`) or "
                      "download it again") from e


def read_text_files(paths: Sequence[str], field: str = "text") -> list[str]:
  """Documents from local files: a `.jsonl`/`.json` file (optionally gzipped: `.jsonl.gz`, `.json.gz`) gives one
  document per line (its `field`; a `.json` may also be one JSON array of objects), any other file is one
  UTF-8 document. Raises ConfigError naming the file (and line) that is missing, unreadable, not UTF-8, not JSON
  or without `field`."""
  texts = []
  for p in paths:
    if not os.path.isfile(p):
      raise ConfigError(f"calibration text file {p!r} does not exist")
    data = _read_bytes(p)
    if p.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
      texts += _json_lines(p, data, field)
    else:
      texts.append(_utf8(p, data))
  return texts


def load_dataset_texts(path: str, split: str = "train", field: str = "text", data_files=None,
                       name: str | None = None, limit: int | None = None, cache_dir: str | None = None) -> list[str]:
  """Texts of a `datasets` dataset, offline: a hub name already in the local cache (e.g. "allenai/c4" with
  data_files="en/c4-train.00000-of-01024.json.gz"), or a local json/json.gz/text/parquet file.

  Returns the first `limit` values of column `field` (cache_dir: the datasets cache, default HF's).
  Raises ConfigError if it cannot be loaded offline.
  """
  import datasets  # optional heavy import

  builder, files, local = path, data_files, os.path.isfile(path)
  if local:
    ext = path.split(".")[-1] if not path.endswith(".gz") else path.split(".")[-2]
    builder = {"jsonl": "json", "json": "json", "txt": "text", "parquet": "parquet"}.get(ext, "text")
    files = path
  try:
    ds = datasets.load_dataset(builder, name, data_files=files, split=split, cache_dir=cache_dir)
  except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError)
    if local:
      raise ConfigError(f"calibration file {path}: cannot be read as {builder} ({type(e).__name__}: {e}); check "
                        "that the file is complete and of the type its name says, or pass another file") from e
    raise ConfigError(f"could not load calibration dataset {path!r} (split {split!r}, data_files {data_files!r}) "
                      f"offline: {type(e).__name__}: {e}. Download it into the HF cache first, or pass a local "
                      "file") from e
  if field not in ds.column_names:
    raise ConfigError(f"calibration {'file' if local else 'dataset'} {path}: columns {ds.column_names}, no "
                      f"{field!r}; name the text column with --config.calib.text_field")
  n = len(ds) if limit is None else min(limit, len(ds))
  return list(ds.select(range(n))[field])

