"""The study's weight-only entries of the package's own weight methods (quant/methods.py), with the dLLM PTQ
study's settings (arXiv 2508.14896, experimental setup) from the study config's `weight_only` section:

  rtn    fake-quantized RTN per group (`weight_activation.fake_quant_weights`, float32 scales), no data
  gptq   the packed streaming pipeline (quant/pipeline.py) with one rule for every block linear, calibrated on
         the study's plain unmasked windows
"""
from __future__ import annotations

from qdllm_jax.baselines import weight_activation
from qdllm_jax.baselines.study_method import StudyMethod
from qdllm_jax.quant import pipeline, rules


def _rtn(model, calib_ids, w_bits, a_bits, settings, key):
  """RTN W{w_bits}A16 fake quantization (calib_ids, a_bits and key unused)."""
  del calib_ids, a_bits, key
  wo = settings["weight_only"]
  qp = weight_activation.fake_quant_weights(model.params, w_bits, group_size=wo["group_size"], sym=wo["sym"])
  return weight_activation.make_model(qp, model.config)


def _packed(method: str):
  """The build of a registered weight method run by the packed pipeline on the calibration windows."""
  def build(model, calib_ids, w_bits, a_bits, settings, key):
    del a_bits, key
    wo = settings["weight_only"]
    plan = rules.default_rules(method, w_bits, wo["group_size"], sym=wo["sym"], percdamp=wo["percdamp"])
    qparams, _ = pipeline.quantize_model((model.params, model.config), calib_ids, plan)
    return model.replace_params(qparams)
  return build


RTN = StudyMethod(name="rtn", weight_activation=False, sections=("weight_only",), build=_rtn)
GPTQ = StudyMethod(name="gptq", weight_activation=False, sections=("weight_only",), build=_packed("gptq"))

__all__ = ["RTN", "GPTQ"]
