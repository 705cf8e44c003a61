"""The PTQ study (arXiv 2508.14896, Tables 1-4) on LLaDA-8B-Base with the paper's settings: WikiText-2
(offline HF cache or a local file) 128 x 2048 plain windows, group 128, SmoothQuant/DuQuant alpha 0.5, DuQuant
block 128 / rotation step 256 / clip 0.9-0.8, QuaRot with GPTQ weights; lm-eval protocol `qdlm_llada`
(needs the `eval` extra and local task data).

  python -m qdllm_jax.study --config configs/study_llada8b.py --config.model_path=/ckpt/LLaDA-8B-Base \\
      --workdir /runs/study_llada8b
"""
from qdllm_jax import study


def get_config():
  return study.study_config(**{"dtype": "bfloat16", "calib.source": "wikitext2", "calib.nsamples": 128,
                         "calib.seqlen": 2048, "eval.protocol": "qdlm_llada"})
