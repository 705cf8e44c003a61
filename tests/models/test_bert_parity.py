"""Parity with transformers' PyTorch BertModel / BertForMaskedLM (an independent implementation) on the real
all-MiniLM-L6-v2 weights: random ids with padding, float32, max |diff| <= 1e-4."""
import numpy as np
import pytest
from bert_fixtures import padded_ids, write_truncated

from qdllm_jax.models import hf_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.torch


def test_minilm_matches_transformers(minilm_dir):
  ours = hf_checkpoint.load_pretrained(minilm_dir)
  ref = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
  ids, mask = padded_ids(np.random.default_rng(0), 4, 40)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids.astype(np.int64)),
               attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state.numpy()
  got = np.asarray(ours(ids, mask))
  assert got.shape == (4, 40, 384)
  real = mask.astype(bool)  # padding positions too: both compute them the same way
  assert np.abs(got - want).max() <= 1e-4, np.abs(got - want)[real].max()


def test_masked_lm_head_matches_transformers(minilm_dir, tmp_path):
  """A BertForMaskedLM (bert. prefix, cls.predictions head with random transform/bias, decoder tied to the word
  embeddings) saved by transformers itself, 2 layers of the real weights."""
  src = write_truncated(minilm_dir, str(tmp_path / "src"))
  torch.manual_seed(0)
  mlm = transformers.BertForMaskedLM.from_pretrained(src, attn_implementation="eager").eval()
  with torch.no_grad():
    for prm in mlm.cls.predictions.transform.parameters():
      prm.add_(0.05 * torch.randn_like(prm))
    mlm.cls.predictions.bias.copy_(0.1 * torch.randn_like(mlm.cls.predictions.bias))
  mlm.save_pretrained(str(tmp_path / "mlm"), safe_serialization=True)
  for f in ("tokenizer.json", "vocab.txt"):
    (tmp_path / "mlm" / f).write_bytes((tmp_path / "src" / f).read_bytes())
  ours = hf_checkpoint.load_pretrained(str(tmp_path / "mlm"))
  assert ours.config.has_head and ours.config.tensor_prefix == "bert." and ours.config.mask_id == 103
  ids, mask = padded_ids(np.random.default_rng(1), 2, 16)
  with torch.no_grad():
    want = mlm(input_ids=torch.from_numpy(ids.astype(np.int64)),
               attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
  got = np.asarray(ours(ids, mask))
  assert got.shape == (2, 16, 30522)
  assert np.abs(got - want).max() <= 1e-4
