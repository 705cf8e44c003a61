"""Fixtures for the checkpoint tests (helpers in ckpt_common.py)."""
import json

import pytest
from ckpt_common import build_qparams


@pytest.fixture(scope="session")
def qparams():
  return build_qparams()


@pytest.fixture
def tokdir(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  d = tmp_path / "tok"
  d.mkdir()
  (d / "tokenizer.json").write_text(tok.to_str())
  (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                       "unk_token": "<unk>"}))
  return d
