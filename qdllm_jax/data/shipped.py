"""Where the files shipped inside the package are: the tiny LLaDA checkpoint and the KJV corpus.

They are package data (qdllm_jax/shipped/), so an installed package (`pip install .`, not only a checkout) finds
them; nothing locates them relative to a source tree.
"""
from __future__ import annotations

import os

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shipped")
TINY_MODEL_DIR = os.path.join(SHIPPED_DIR, "tiny-llada")  # config.json, model.safetensors, tokenizer files
CORPUS_DIR = os.path.join(SHIPPED_DIR, "corpus")
CORPUS_PATH = os.path.join(CORPUS_DIR, "kjv.txt")  # one chapter per document (data/corpus.py)
