"""The shipped public-domain English corpus: King James Version chapters, split train / held-out by hash.

Source: Debian package `bible-kjv-text` 4.38 (text) read with the `bible` program of `bible-kjv` 4.38;
see `qdllm_jax/shipped/corpus/SOURCE.md`. The shipped file `qdllm_jax/shipped/corpus/kjv.txt` holds one document
per chapter:

    <Book> <chapter>\n<verse 1>\n<verse 2>\n...      (documents separated by one blank line)

`extract_kjv()` rebuilds that file from the Debian program; everything else reads the shipped file only.
The split is deterministic: a chapter is held out when sha256("kjv:" + its title) mod 20 == 0 (about 5 %).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess

from qdllm_jax.data.shipped import CORPUS_PATH
from qdllm_jax.errors import ConfigError

# Narrative, wisdom and gospel books: about 2 MB of plain text.
BOOKS = ("Genesis", "Exodus", "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "Esther",
         "Psalms", "Proverbs", "Ecclesiastes", "Daniel", "Jonah", "Matthew", "Mark", "Luke", "John", "Acts")
HELDOUT_MOD = 20


def _clean_chapter(raw: str) -> str:
  """'Genesis 1\\n\\n  1 In the ...\\n  2 And ...' -> 'Genesis 1\\nIn the ...\\nAnd ...' (verse numbers dropped)."""
  lines = [l.strip() for l in raw.strip("\n").split("\n")]
  title, verses = lines[0], []
  for l in lines[1:]:
    if not l:
      continue
    m = re.match(r"^(\d+) (.*)$", l)
    if m:
      verses.append(m.group(2))
    elif verses:  # a wrapped continuation line
      verses[-1] += " " + l
  text = "\n".join([title] + verses)
  return re.sub(r"[ \t]+", " ", text)


def extract_kjv(out_path: str = CORPUS_PATH, books=BOOKS, bible_bin: str = "bible") -> int:
  """Write the cleaned corpus file from the Debian `bible` program (apt-get install bible-kjv).

  Returns the number of bytes written.
  """
  if shutil.which(bible_bin) is None:
    raise ConfigError(f"program {bible_bin!r} not found; expected the Debian `bible` CLI. "
                      "Install it with `apt-get install bible-kjv` (it pulls bible-kjv-text)")
  raw = subprocess.run([bible_bin, "-l0", "Gen1:1-Rev22:21"], check=True, capture_output=True,
                       text=True).stdout
  chapters = [c for c in re.split(r"\n(?=\S[^\n]* \d+\n)", raw) if c.strip()]
  keep = [_clean_chapter(c) for c in chapters if c.strip().split("\n", 1)[0].rsplit(" ", 1)[0] in books]
  if not keep:
    raise ConfigError(f"`{bible_bin}` printed no chapters of {books[:3]}...; expected the KJV text")
  data = "\n\n".join(keep) + "\n"
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  with open(out_path, "w", encoding="utf-8") as f:
    f.write(data)
  return len(data.encode("utf-8"))


def read_documents(path: str = CORPUS_PATH) -> list[str]:
  """All chapters of the corpus file, in file order (each 'Title\\nverse\\nverse...')."""
  if not os.path.exists(path):
    raise ConfigError(f"corpus file {path} not found; expected the shipped qdllm_jax/shipped/corpus/kjv.txt. "
                      "Rebuild it with qdllm_jax.data.corpus.extract_kjv()")
  with open(path, encoding="utf-8") as f:
    docs = [d.strip("\n") for d in f.read().split("\n\n") if d.strip()]
  return docs


def is_heldout(doc: str) -> bool:
  """Held out iff sha256('kjv:' + title) mod 20 == 0, the title being the document's first line."""
  title = doc.split("\n", 1)[0]
  return int(hashlib.sha256(("kjv:" + title).encode()).hexdigest(), 16) % HELDOUT_MOD == 0


def load_splits(path: str = CORPUS_PATH) -> dict[str, list[str]]:
  """{'train': [doc, ...], 'heldout': [doc, ...]}: a deterministic ~95 / 5 split of chapters by title hash."""
  docs = read_documents(path)
  return {"train": [d for d in docs if not is_heldout(d)], "heldout": [d for d in docs if is_heldout(d)]}
