"""The PTQ study (arXiv 2508.14896) on the shipped tiny LLaDA: GPTQ / AWQ at W4A16 and W3A16, SmoothQuant /
QuaRot / DuQuant at W8A8 and W4A4, against FP, under the `tiny` protocol; plus GPTQ / AWQ at W2A16 (beyond the
paper: the tiny model keeps W3 intact, so W2 is where weight-only methods separate).

  python -m qdllm_jax.study --config configs/study_tiny.py --workdir runs/study_tiny

Calibration as the study (plain unmasked text, no [MASK] tokens): 32 windows of 128 tokens of the shipped KJV
training chapters. Group 128 (the tiny matrices have 256 and 1024 input columns) and DuQuant's block 128
are the paper's settings unchanged.
"""
from qdllm_jax import study
from qdllm_jax.data.shipped import TINY_MODEL_DIR


def get_config():
  return study.study_config(**{
      "entries": tuple(study.defaults().entries) + ("gptq:w2a16", "awq:w2a16"),
      "model_path": TINY_MODEL_DIR, "dtype": "float32",
      "calib.source": "corpus", "calib.nsamples": 32, "calib.seqlen": 128, "eval.protocol": "tiny"})
