"""The PTQ study (arXiv 2508.14896) on the shipped tiny LLaDA: GPTQ / AWQ at W4A16 and W3A16, SmoothQuant /
QuaRot / DuQuant at W8A8 and W4A4, against FP, under the `tiny` protocol; plus GPTQ / AWQ at W2A16 (beyond the
paper: the tiny model keeps W3 intact, so W2 is where weight-only methods separate).

  python -m qdllm_jax.study --config configs/study_tiny.py --workdir runs/study_tiny

Calibration as the study (plain unmasked text, no [MASK] tokens): 32 windows of 128 tokens of the shipped KJV
training chapters. Group 128 (the tiny matrices have 256 and 1024 input columns) and DuQuant's block 128
are the paper's settings unchanged.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from configs._common import REPO_ROOT, study_config  # noqa: E402


def get_config():
  from qdllm_jax import study
  return study_config(**{
      "entries": tuple(study.defaults().entries) + ("gptq:w2a16", "awq:w2a16"),
      "model_path": os.path.join(REPO_ROOT, "assets", "tiny-llada"), "dtype": "float32",
      "calib.source": "corpus", "calib.nsamples": 32, "calib.seqlen": 128, "eval.protocol": "tiny"})
